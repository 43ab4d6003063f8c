//! Checkpoints of the file modes: every stream's state and record blocks as of a point of the
//! log, so that start-up replays only the segments from that point on (see `server/STORAGE.md`,
//! "Checkpoint").
//!
//! `wal/checkpoint` is written by the writer thread under a temporary name, synced, renamed and
//! the directory synced (`fsutil::write_atomically`), and only once the log up to its point is
//! durable. Recovery uses it when its checksum holds and the log still has the batch it names
//! at the place it names; otherwise (torn, damaged, stale, from a log that was cut short since)
//! it says why and replays the whole log, as without one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::blocks::Block;
use super::frame::{self, Decoded, LogPos};
use super::wal::segment_path;
use super::{Index, LogShared};
use crate::storage::{ProducerState, ProducerTuple, StorageError, StreamMeta};

pub(crate) const FILE: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"DSCKPT\0\0";
const VERSION: u32 = 1;
/// Magic, version, CRC-32C of the body, body length.
const HEADER_LEN: usize = 24;

/// One stream as a checkpoint keeps it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Stream {
    /// The stream's state, as a STATE frame holds it (`moved_from` unused).
    pub state: frame::StreamState,
    /// Segments from `base` on with a frame of the stream.
    pub touched: Vec<u32>,
    /// The segment of its newest CREATE or STATE frame.
    pub base: u32,
    /// Its retained records.
    pub blocks: Vec<Block>,
}

/// The log as of `from`: [`Stream`]s when read back, [`Taken`]s when the writer takes one.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Checkpoint<S = Stream> {
    /// Where replay starts: the end of the log when the checkpoint was taken.
    pub from: LogPos,
    /// The last batch before `from`: its sequence number and where its BATCH frame is.
    pub last_batch: u64,
    pub last_batch_at: LogPos,
    /// Segments before `from`'s: id and the length of their frames.
    pub segments: Vec<(u32, u64)>,
    pub streams: Vec<S>,
}

/// One stream as the writer takes it for a checkpoint: what may change after (state, touched
/// segments, blocks) copied, the metadata (fixed at creation) shared with the stream. Encodes
/// exactly as a [`Stream`] does. About 130 bytes per stream while the checkpoint is written,
/// where a [`Stream`] copy of the metadata and state took about 350 (at a million streams
/// those copies, and the whole encoded file built in RAM before it was written, were most of
/// a checkpoint's 600 MB of RAM).
pub(crate) struct Taken {
    log: Arc<LogShared>,
    tail: u64,
    released: u64,
    closed: bool,
    soft_deleted: bool,
    closed_by: Option<Box<ProducerTuple>>,
    last_seq: Option<Box<str>>,
    /// Sorted, so that equal states encode alike.
    producers: Vec<(Box<str>, ProducerState)>,
    touched: Vec<u32>,
    base: u32,
    blocks: Vec<Block>,
}

impl Taken {
    /// `log` as its index says now (the writer thread holds the log's end still).
    pub fn of(log: &Arc<LogShared>, index: &Index) -> Taken {
        let m = &index.mirror;
        let mut producers: Vec<(Box<str>, ProducerState)> =
            m.producers.iter().map(|(k, v)| (k.into(), *v)).collect();
        producers.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Taken {
            log: log.clone(),
            tail: m.tail,
            released: index.released,
            closed: m.closed,
            soft_deleted: m.soft_deleted,
            closed_by: m.closed_by.clone(),
            last_seq: m.last_seq.clone(),
            producers,
            touched: index.touched.to_vec(),
            base: index.base,
            blocks: index.blocks.iter().copied().collect(),
        }
    }

    pub fn id(&self) -> crate::storage::StreamId {
        self.log.id()
    }
}

impl Serialize for Taken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// [`frame::StreamState`], borrowed: the same fields, names and omissions.
        #[derive(Serialize)]
        struct State<'a> {
            meta: &'a StreamMeta,
            tail: u64,
            released: u64,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            closed: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            closed_by: Option<&'a ProducerTuple>,
            #[serde(skip_serializing_if = "Option::is_none")]
            last_seq: Option<&'a str>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            producers: &'a [(Box<str>, ProducerState)],
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            soft_deleted: bool,
            moved_from: u64,
        }
        /// [`Stream`], borrowed.
        #[derive(Serialize)]
        struct Out<'a> {
            state: State<'a>,
            touched: &'a [u32],
            base: u32,
            blocks: &'a [Block],
        }
        Out {
            state: State {
                meta: &self.log.meta,
                tail: self.tail,
                released: self.released,
                closed: self.closed,
                closed_by: self.closed_by.as_deref(),
                last_seq: self.last_seq.as_deref(),
                producers: &self.producers,
                soft_deleted: self.soft_deleted,
                moved_from: 0,
            },
            touched: &self.touched,
            base: self.base,
            blocks: &self.blocks,
        }
        .serialize(serializer)
    }
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Counts and checksums what goes through it.
struct Summing<W> {
    inner: W,
    crc: u32,
    len: u64,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn header(crc: u32, len: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out[16..24].copy_from_slice(&len.to_le_bytes());
    out
}

/// Writes the checkpoint's body to `out` as it is encoded (never the whole of it in RAM);
/// returns its checksum and length, for the header.
fn encode_body<S: Serialize>(out: impl Write, c: &Checkpoint<S>) -> std::io::Result<(u32, u64)> {
    let mut body = Summing {
        inner: std::io::BufWriter::with_capacity(1 << 20, out),
        crc: 0,
        len: 0,
    };
    serde_json::to_writer(&mut body, c).map_err(std::io::Error::other)?;
    body.flush()?;
    Ok((body.crc, body.len))
}

#[cfg(test)]
pub(crate) fn encode<S: Serialize>(c: &Checkpoint<S>) -> Vec<u8> {
    let mut body = Vec::new();
    let (crc, len) = encode_body(&mut body, c).unwrap_or_default();
    let mut out = header(crc, len).to_vec();
    out.extend_from_slice(&body);
    out
}

/// Writes `c` over the directory's checkpoint (atomically; crash points `checkpoint-tmp-written`
/// and `checkpoint-renamed`): a placeholder header, the body as it is encoded, then the header.
pub(crate) fn write<S: Serialize>(dir: &Path, c: &Checkpoint<S>) -> Result<usize, StorageError> {
    crate::storage::fsutil::write_atomically_with(&path(dir), "checkpoint", |f| {
        use std::os::unix::fs::FileExt;
        f.write_all(&[0u8; HEADER_LEN])?;
        let (crc, len) = encode_body(&mut *f, c)?;
        f.write_all_at(&header(crc, len), 0)?;
        Ok(HEADER_LEN + len as usize)
    })
}

/// What a checkpoint write reports: the segment it replays from and its size, or the failure.
pub(crate) type Outcome = (u32, Result<usize, StorageError>);

/// Writes checkpoints on a thread of their own (one at a time), so that the log's writer
/// thread only takes them. Dropping it waits for the write in flight.
#[derive(Default)]
pub(crate) struct Background {
    in_flight: Option<InFlight>,
}

enum InFlight {
    Thread(std::thread::JoinHandle<Outcome>),
    /// No thread could be started: written on the caller's thread instead.
    Done(Outcome),
}

/// [`write`], noting its size and duration in the log.
fn write_logged(dir: &Path, c: &Checkpoint<Taken>) -> Outcome {
    let started = std::time::Instant::now();
    let outcome = write(dir, c);
    if let Ok(len) = &outcome {
        tracing::debug!(
            bytes = len,
            streams = c.streams.len(),
            ms = started.elapsed().as_millis() as u64,
            "checkpoint written"
        );
    }
    (c.from.0, outcome)
}

impl Background {
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Starts writing `c` (the caller checks that none is in flight); if no thread can be
    /// started, writes it here, and [`Background::outcome`] reports it all the same.
    pub fn start(&mut self, dir: &Path, c: Checkpoint<Taken>) {
        debug_assert!(self.in_flight.is_none());
        let c = Arc::new(c);
        let job = {
            let (dir, c) = (dir.to_path_buf(), c.clone());
            move || write_logged(&dir, &c)
        };
        let spawned = std::thread::Builder::new()
            .name("ds-checkpoint".into())
            .spawn(job);
        self.in_flight = Some(match spawned {
            Ok(handle) => InFlight::Thread(handle),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for the checkpoint; writing it here");
                InFlight::Done(write_logged(dir, &c))
            }
        });
    }

    /// The write's outcome once it is done (`wait`: waits for it); `None` while it runs or
    /// when none was started.
    pub fn outcome(&mut self, wait: bool) -> Option<Outcome> {
        if let Some(InFlight::Thread(handle)) = &self.in_flight
            && !wait
            && !handle.is_finished()
        {
            return None;
        }
        Some(match self.in_flight.take()? {
            InFlight::Done(outcome) => outcome,
            InFlight::Thread(handle) => handle.join().unwrap_or_else(|_| {
                (
                    0,
                    Err(StorageError::Io {
                        what: "writing a checkpoint".into(),
                        source: std::io::Error::other("the checkpoint thread panicked"),
                    }),
                )
            }),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.outcome(true);
    }
}

fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("not a checkpoint (short or bad magic)".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(format!(
            "checkpoint version {version}; this build reads {VERSION}"
        ));
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(format!("{} bytes where {len} were written", body.len()));
    }
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("does not parse: {e}"))
}

/// The directory's checkpoint if there is one and it matches the log (`ids`: the segments
/// present, ascending). A checkpoint that does not is set aside with a warning: recovery then
/// replays the whole log.
pub(crate) fn load(dir: &Path, ids: &[u32]) -> Option<Checkpoint> {
    let path = path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "checkpoint unreadable; replaying the whole log");
            return None;
        }
    };
    match decode(&bytes).and_then(|c| check(dir, ids, c)) {
        Ok(c) => Some(c),
        Err(why) => {
            tracing::warn!(file = %path.display(), why, "checkpoint not used; replaying the whole log");
            // Gone, so that it can never be taken for a later log's (the writer writes a new
            // one soon after the start-up).
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "could not remove the checkpoint");
            }
            None
        }
    }
}

/// Whether the log still is what the checkpoint saw: its replay segment is there, every older
/// segment present is one it knows, and its last batch is where it says, ending at `from` when
/// in the same segment.
fn check(dir: &Path, ids: &[u32], c: Checkpoint) -> Result<Checkpoint, String> {
    let (seg, off) = c.from;
    if !ids.contains(&seg) {
        return Err(format!("its segment {seg} is gone"));
    }
    if let Some(unknown) = ids
        .iter()
        .take_while(|&&id| id < seg)
        .find(|&&id| c.segments.iter().all(|s| s.0 != id))
    {
        return Err(format!("segment {unknown} is not in it"));
    }
    let (bseg, boff) = c.last_batch_at;
    if bseg > seg || (bseg == seg && boff >= off) || !ids.contains(&bseg) {
        return Err(format!(
            "its last batch at {:?} is not before {:?}",
            c.last_batch_at, c.from
        ));
    }
    let batch = read_at(&segment_path(dir, bseg), boff, frame::BATCH_FRAME_LEN)
        .map_err(|e| format!("reading its last batch: {e}"))?;
    match frame::decode(&batch) {
        Ok((Decoded::Batch { seq, len, .. }, _)) if seq == c.last_batch => {
            let end = boff + frame::BATCH_FRAME_LEN as u64 + u64::from(len);
            if bseg == seg && end != off {
                return Err(format!("its last batch ends at {end}, not at {off}"));
            }
        }
        _ => {
            return Err(format!(
                "batch {} is not at {:?} any more",
                c.last_batch, c.last_batch_at
            ));
        }
    }
    Ok(c)
}

fn read_at(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_or_cut_checkpoint_does_not_decode() {
        let c: Checkpoint = Checkpoint {
            from: (3, 100),
            last_batch: 7,
            last_batch_at: (3, 40),
            segments: vec![(2, 500)],
            streams: Vec::new(),
        };
        let bytes = encode(&c);
        assert!(decode(&bytes).is_ok());
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("checksum"));
        assert!(decode(&[]).is_err());
    }

    /// What the writer takes encodes exactly as what recovery reads back.
    #[test]
    fn a_taken_stream_encodes_as_a_stream() {
        let meta = StreamMeta::new(9, "/a/b", "application/json", Some(5), 3);
        let p = |epoch, last_seq| ProducerState {
            epoch,
            last_seq,
            last_ms: 11,
        };
        let block = Block {
            start: 0,
            end: 10,
            off: 16,
            span: 40,
            seg: 2,
            count: 2,
            packed: false,
        };
        for full in [false, true] {
            let mut index = Index {
                released: 4,
                base: 2,
                touched: smallvec::smallvec![2, 3],
                ..Index::default()
            };
            index.mirror.tail = 10;
            if full {
                index.blocks.list.push_back(block);
                index.mirror.closed = true;
                index.mirror.soft_deleted = true;
                index.mirror.closed_by = Some(Box::new(ProducerTuple {
                    id: "c".into(),
                    epoch: 1,
                    seq: 2,
                }));
                index.mirror.last_seq = Some("s7".into());
                index.mirror.producers.insert("zz".into(), p(1, 2));
                index.mirror.producers.insert("aa".into(), p(3, 4));
            }
            let log = Arc::new(LogShared {
                meta: Arc::new(meta.clone()),
                index: parking_lot::RwLock::new(Index::default()),
            });
            let taken = Taken::of(&log, &index);
            let stream = Stream {
                state: frame::StreamState {
                    meta: meta.clone(),
                    tail: 10,
                    released: 4,
                    closed: full,
                    closed_by: full.then(|| ProducerTuple {
                        id: "c".into(),
                        epoch: 1,
                        seq: 2,
                    }),
                    last_seq: full.then(|| "s7".into()),
                    producers: if full {
                        vec![("aa".into(), p(3, 4)), ("zz".into(), p(1, 2))]
                    } else {
                        Vec::new()
                    },
                    soft_deleted: full,
                    moved_from: 0,
                },
                touched: vec![2, 3],
                base: 2,
                blocks: if full { vec![block] } else { Vec::new() },
            };
            assert_eq!(
                serde_json::to_string(&taken).unwrap(),
                serde_json::to_string(&stream).unwrap()
            );
        }
        // And a whole checkpoint written that way reads back.
        let c = Checkpoint {
            from: (3, 100),
            last_batch: 7,
            last_batch_at: (3, 40),
            segments: vec![(2, 500)],
            streams: vec![Taken::of(
                &Arc::new(LogShared {
                    meta: Arc::new(meta.clone()),
                    index: parking_lot::RwLock::new(Index::default()),
                }),
                &Index::default(),
            )],
        };
        let back = decode(&encode(&c)).unwrap();
        assert_eq!(back.streams.len(), 1);
        assert_eq!(back.streams[0].state.meta, meta);
    }
}
