//! `file-fast` and `file-durable`: every stream's frames go to one shared, segmented
//! write-ahead log under `DATA_DIR/wal/`, written by one writer thread.
//!
//! Why one shared log rather than a file per stream: a durable mode must make many concurrent
//! appends share one sync (group commit), and with a file per stream a batch touching 64 streams
//! needs 64 fsyncs. Here a batch of appends to any number of streams is one `write` and, in
//! `file-durable`, one `fdatasync`. Open file handles stay bounded whatever the stream count.
//!
//! - Acknowledged means: `file-fast`, written to the OS (survives a process crash; a power loss
//!   takes what the background sync had not reached, about the last second); `file-durable`,
//!   `fdatasync`ed (survives a power loss).
//! - Each operation is one checksummed frame (data, producer state, `Stream-Seq` and the closed
//!   flag together), so a crash can never re-admit a duplicate or half-apply an append.
//! - Recovery replays the segments in order (from the last checkpoint's point, if there is a
//!   usable one: `checkpoint`), truncates a torn tail, and refuses corruption with the file and
//!   byte position.
//! - Each stream keeps a sparse in-memory index of its records (one block per run of records:
//!   `blocks`) and a small cache of its newest records, so live readers rarely touch the disk;
//!   other reads are `pread`s of whole blocks on a blocking thread, never on the async workers.
//! - Space: a segment file is deleted once it is the oldest and no stream needs it, neither for
//!   its state (its newest CREATE or STATE frame and later frames) nor for retained records
//!   (oldest-first keeps a removal's tombstone around as long as older frames of the removed
//!   stream exist). Released records need nothing; the oldest segment's remaining states and
//!   retained records are written forward in STATE frames when that pays (`wal::Writer::forward`).
//!
//! The format is written down in `server/STORAGE.md`.

mod blocks;
mod checkpoint;
mod frame;

mod recover;
mod wal;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use super::tail_cache::{CacheBudget, TailCache};
use super::{
    AppendEntry, Commit, ProducerState, ProducerTuple, ReadChunk, Recovered, Storage, StorageError,
    StreamId, StreamLog, StreamMeta, plan_read,
};
use blocks::Block;
use wal::{Op, Target, Wal};

/// The name of the file that marks a data directory as file-mode storage.
const FORMAT_FILE: &str = "FORMAT";
const FORMAT_TEXT: &str = "ds-server file storage v1\n";

/// Settings of the file backend.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// `fdatasync` before acknowledging (`file-durable`), or only `write` (`file-fast`).
    pub durable: bool,
    /// Size at which the active segment is rotated.
    pub segment_bytes: u64,
    /// Segment files kept open for reads.
    pub max_open_files: usize,
    /// Reads map the segments' pages rather than copy them (see `mapped`).
    pub map_reads: bool,
    /// RAM for the newest records of all streams together.
    pub cache_bytes: usize,
    /// `file-fast`: how often the log is synced in the background, which bounds what a power
    /// loss can take (see `server/STORAGE.md`). Unused by `file-durable`.
    pub fast_sync_interval: std::time::Duration,
}

/// The file backend.
pub struct FileStorage {
    wal: Arc<Wal>,
    /// Subscription state (see `storage::records`).
    records: super::records::RecordLog,
    /// Filled by `open`, taken by the first `recover`.
    recovered: Mutex<Option<Vec<Recovered>>>,
    /// Bytes of log start-up replayed (after the checkpoint, if one was used).
    replayed: u64,
    /// Held for the life of the process: one server per data directory.
    _lock: File,
}

impl FileStorage {
    /// Opens (creating if needed) the store in `dir`, recovering what is there.
    pub fn open(dir: &Path, options: FileOptions) -> Result<FileStorage, StorageError> {
        let io = |what: &Path| {
            let what = what.display().to_string();
            move |source| StorageError::Io {
                what: what.clone(),
                source,
            }
        };
        super::fsutil::create_dir_synced(dir)?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.try_lock().map_err(|_| StorageError::Corrupt {
            what: lock_path.display().to_string(),
            detail: "another ds-server is using this data directory".into(),
        })?;
        check_format(dir)?;
        let wal_dir = dir.join("wal");
        if !wal_dir.is_dir() {
            std::fs::create_dir(&wal_dir).map_err(io(&wal_dir))?;
            super::fsutil::crash_point("file-wal-dir-created");
            // Strict POSIX makes the new entry durable only with its directory.
            wal::sync_dir(dir)?;
        }
        let recovery = recover::recover(&wal_dir, options.durable)?;
        let replayed = recovery.replayed;
        let records =
            super::records::RecordLog::open(dir, options.durable, options.fast_sync_interval)?;
        let streams: Vec<(Arc<LogShared>, super::WriterSnapshot)> = recovery
            .streams
            .into_iter()
            .map(|r| {
                let mirror = Mirror::from_snapshot(&r.state);
                let shared = Arc::new(LogShared {
                    meta: Arc::new(r.meta),
                    index: RwLock::new(Index {
                        blocks: r.blocks,
                        touched: SmallVec::from_slice(&r.touched),
                        base: r.base,
                        released: r.state.released,
                        mirror,
                        ..Index::default()
                    }),
                });
                (shared, r.state)
            })
            .collect();
        let wal = Wal::start(
            wal_dir,
            options,
            recovery.segments,
            recovery.last_batch,
            recovery.newest_is_current,
            streams.iter().map(|(shared, _)| shared.clone()).collect(),
            recovery.last_batch_at,
            recovery.checkpoint_seg,
            recovery.replayed,
        )?;
        let recovered = streams
            .into_iter()
            .map(|(shared, state)| Recovered {
                meta: shared.meta.clone(),
                state,
                log: Arc::new(FileLog {
                    shared,
                    wal: wal.clone(),
                }) as Arc<dyn StreamLog>,
            })
            .collect();
        Ok(FileStorage {
            wal,
            records,
            recovered: Mutex::new(Some(recovered)),
            replayed,
            _lock: lock,
        })
    }

    /// Bytes of log start-up replayed: all of it without a checkpoint, what followed the
    /// checkpoint with one.
    pub fn replayed_bytes(&self) -> u64 {
        self.replayed
    }

    /// Write batches and operations so far: `ops / batches` is the group-commit factor.
    pub fn commit_stats(&self) -> (u64, u64) {
        self.wal.stats()
    }
}

fn check_format(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if text == FORMAT_TEXT => Ok(()),
        Ok(text) => Err(StorageError::Corrupt {
            what: path.display().to_string(),
            detail: format!(
                "this directory holds {:?}, not file-mode storage; use the mode that wrote it or another DS_STORAGE__DATA_DIR",
                text.trim()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new directory. A crash during an earlier first start may have left `LOCK` and
            // `FORMAT.tmp` (the format is written under that name and renamed): both are ours.
            let tmp = super::fsutil::temp_path(&path);
            let foreign = std::fs::read_dir(dir)
                .map_err(|source| StorageError::Io {
                    what: dir.display().to_string(),
                    source,
                })?
                .filter_map(Result::ok)
                .find(|e| e.file_name() != "LOCK" && e.path() != tmp);
            if let Some(entry) = foreign {
                return Err(StorageError::Corrupt {
                    what: dir.display().to_string(),
                    detail: format!(
                        "directory is not empty (it holds {:?}) and has no {FORMAT_FILE}: it is not file-mode storage; use an empty directory",
                        entry.file_name()
                    ),
                });
            }
            super::fsutil::remove_leftover(&tmp)?;
            super::fsutil::write_atomically(&path, FORMAT_TEXT.as_bytes(), "file-format")
        }
        Err(source) => Err(StorageError::Io {
            what: path.display().to_string(),
            source,
        }),
    }
}

impl Storage for FileStorage {
    fn keeps_records(&self) -> bool {
        true
    }

    fn write_records(&self, batch: Vec<super::RecordWrite>) -> Commit {
        self.records.write(batch)
    }

    fn recover_records(&self) -> Result<Vec<super::Record>, StorageError> {
        Ok(self.records.take_recovered())
    }

    fn name(&self) -> &'static str {
        if self.wal.durable() {
            "file-durable"
        } else {
            "file-fast"
        }
    }

    fn memory_budget(&self) -> Option<(u64, u64)> {
        Some(self.wal.cache.usage())
    }

    fn create(
        &self,
        meta: &Arc<StreamMeta>,
        initial: Vec<Bytes>,
        close: Option<Option<ProducerTuple>>,
    ) -> Result<(Arc<dyn StreamLog>, Commit), StorageError> {
        let initial: Vec<Bytes> = initial.into_iter().filter(|d| !d.is_empty()).collect();
        let start = meta.fork().map_or(0, |f| f.offset);
        let shared = Arc::new(LogShared {
            meta: meta.clone(),
            index: RwLock::new(Index {
                released: start,
                mirror: Mirror {
                    tail: start,
                    closed: close.is_some(),
                    closed_by: close.clone().flatten().map(Box::new),
                    ..Mirror::default()
                },
                ..Index::default()
            }),
        });
        let encoded = frame::encode_create(
            &frame::CreateMeta {
                meta: StreamMeta::clone(meta),
                closed: close.is_some(),
            },
            &initial,
        );
        let commit = self.wal.submit(Op {
            frame: encoded,
            target: Target::Create {
                log: shared.clone(),
                data: initial,
            },
        });
        let log = FileLog {
            shared,
            wal: self.wal.clone(),
        };
        Ok((Arc::new(log), commit))
    }

    fn recover(&self) -> Result<Vec<Recovered>, StorageError> {
        Ok(self.recovered.lock().take().unwrap_or_default())
    }
}

/// One stream's record index and cache, shared by its `FileLog` and the writer thread.
///
/// Every stream has one for as long as it exists, idle or not, so it is kept to jemalloc's
/// 192-byte class with its `Arc` (`size::a_stream_index_fits_a_192_byte_allocation`): the id and
/// log start are read from `meta`, and what most streams never have (cached records, a closing
/// producer, a `Stream-Seq`, producers) is boxed or left empty until used.
pub(crate) struct LogShared {
    /// The stream's configuration, for the STATE frames that carry it forward (shared with
    /// the stream layer).
    pub meta: Arc<StreamMeta>,
    pub index: RwLock<Index>,
}

impl LogShared {
    pub fn id(&self) -> StreamId {
        self.meta.id
    }

    /// Position of the stream's first own byte (the fork anchor, or 0).
    pub fn start(&self) -> u64 {
        self.meta.fork().map_or(0, |f| f.offset)
    }
}

#[derive(Default)]
pub(crate) struct Index {
    /// The retained records, in blocks, ascending (blocks of released records are dropped
    /// from the front; the first block may start before the retained start).
    pub blocks: blocks::Blocks,
    /// The newest records' bytes: always a suffix of the records.
    pub cache: TailCache,
    /// Segments from `base` on holding a frame of this stream, ascending: the frames recovery
    /// needs for its state (its retained records keep their segments through their bytes).
    /// Most streams touch one to four: kept inline (a `Vec`'s size, without its allocation).
    pub touched: SmallVec<[u32; 4]>,
    pub removed: bool,
    /// The segment of the stream's newest CREATE or STATE frame: recovery needs that frame and
    /// every later frame of the stream, so segments from it on are pinned.
    pub base: u32,
    /// The retained start: data before it is released (the log start when none is).
    pub released: u64,
    /// The stream's writer state as the log says it so far (kept by the writer thread), which a
    /// STATE frame writes forward.
    pub mirror: Mirror,
    /// About the bytes a STATE frame of this stream takes (for the log's live bytes).
    pub state_len: u32,
}

/// A stream's writer state as of the frames written so far. It is not the stream layer's
/// (which runs ahead by the appends submitted and not yet written): a STATE frame or checkpoint
/// must say exactly what the log before it says, or a crash right after it could keep a
/// producer's sequence number without the data it came with.
#[derive(Clone, Debug, Default)]
pub(crate) struct Mirror {
    pub tail: u64,
    pub closed: bool,
    pub soft_deleted: bool,
    pub closed_by: Option<Box<ProducerTuple>>,
    pub last_seq: Option<Box<str>>,
    pub producers: Producers,
}

/// A stream's producer states as the log has them: made by the first producer (most streams
/// have none, and an empty map is 48 bytes), keyed by a boxed `str` (16 bytes, not 24).
#[derive(Clone, Debug, Default)]
// Boxed on purpose: `Option<Box<_>>` is 8 bytes in every stream, a map 48.
#[allow(clippy::box_collection)]
pub(crate) struct Producers(Option<Box<HashMap<Box<str>, ProducerState>>>);

impl Producers {
    /// Sets `id`'s state; true if the producer is new.
    pub fn insert(&mut self, id: String, state: ProducerState) -> bool {
        let map = self.0.get_or_insert_with(Box::default);
        map.insert(id.into_boxed_str(), state).is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ProducerState)> {
        self.0.iter().flat_map(|m| m.iter().map(|(k, v)| (&**k, v)))
    }
}

impl Mirror {
    fn from_snapshot(s: &super::WriterSnapshot) -> Mirror {
        let mut producers = Producers::default();
        for (id, state) in &s.producers {
            producers.insert(id.clone(), *state);
        }
        Mirror {
            tail: s.tail,
            closed: s.closed,
            closed_by: s.closed_by.clone().map(Box::new),
            last_seq: s.last_seq.as_deref().map(Into::into),
            producers,
            soft_deleted: s.soft_deleted,
        }
    }
}

impl Index {
    pub fn clear_cache(&mut self, budget: &CacheBudget) {
        self.cache.clear(budget);
    }
}

/// One stream's log in the file backend.
pub struct FileLog {
    shared: Arc<LogShared>,
    wal: Arc<Wal>,
}

impl StreamLog for FileLog {
    fn append(&self, entry: AppendEntry) -> Commit {
        let encoded = frame::encode_append(self.shared.id(), &entry);
        self.wal.submit(Op {
            frame: encoded,
            target: Target::Append {
                log: self.shared.clone(),
                start: entry.start,
                data: entry.data.filter(|d| !d.is_empty()),
                change: (entry.close.is_some()
                    || entry.stream_seq.is_some()
                    || entry.producer.is_some())
                .then(|| {
                    Box::new(wal::StateChange {
                        close: entry.close,
                        stream_seq: entry.stream_seq,
                        producer: entry.producer,
                    })
                }),
            },
        })
    }

    fn release(&self, before: u64) -> Commit {
        {
            let index = self.shared.index.read();
            if before <= index.released || index.removed {
                return super::done();
            }
            if before > index.mirror.tail {
                return Box::pin(std::future::ready(Err(StorageError::Corrupt {
                    what: format!("releasing stream {}", self.shared.id()),
                    detail: format!(
                        "release before {before} is past the tail {}",
                        index.mirror.tail
                    ),
                })));
            }
        }
        self.wal.submit(Op {
            frame: frame::encode_release(self.shared.id(), before),
            target: Target::Release {
                log: self.shared.clone(),
                before,
            },
        })
    }

    fn mark_soft_deleted(&self) -> Commit {
        self.wal.submit(Op {
            frame: frame::encode_marker(frame::KIND_SOFT_DELETE, self.shared.id()),
            target: Target::SoftDelete(self.shared.clone()),
        })
    }

    fn remove(&self) -> Commit {
        self.wal.submit(Op {
            frame: frame::encode_marker(frame::KIND_REMOVE, self.shared.id()),
            target: Target::Remove(self.shared.clone()),
        })
    }

    fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> BoxFuture<'static, Result<ReadChunk, StorageError>> {
        let q = Query {
            from,
            until,
            max_bytes,
            split,
        };
        let (blocks, cached) = match plan(&self.shared, &q) {
            Ok(Planned::Done(chunk)) => return Box::pin(std::future::ready(Ok(chunk))),
            Ok(Planned::Disk { blocks, cached }) => (blocks, cached),
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let (wal, shared) = (self.wal.clone(), self.shared.clone());
        Box::pin(async move {
            let (mut blocks, mut cached) = (blocks, cached);
            let mut replanned = 0;
            loop {
                let (wal, id) = (wal.clone(), shared.id());
                let from = q.from;
                let read = tokio::task::spawn_blocking(move || {
                    read_blocks(&wal, id, &blocks, cached, from)
                })
                .await
                .map_err(|e| StorageError::Io {
                    what: "read task".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                match read {
                    // The segment was deleted after the read was planned: everything in it was
                    // released, or written forward, since. Planned again, the read either
                    // finds the records where they are now or is refused as released.
                    Err(StorageError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound
                            && replanned < MAX_REPLANS =>
                    {
                        replanned += 1;
                        match plan(&shared, &q)? {
                            Planned::Done(chunk) => return Ok(chunk),
                            Planned::Disk {
                                blocks: b,
                                cached: c,
                            } => (blocks, cached) = (b, c),
                        }
                    }
                    read => return finish(&read?, shared.start(), &q),
                }
            }
        })
    }
}

/// How often a read is planned again after a segment it was to read from went away. Each time
/// means a release or a write-forward moved its records in between; one is the usual case.
const MAX_REPLANS: u32 = 8;

/// A read's arguments (see `StreamLog::read`).
struct Query {
    from: u64,
    until: u64,
    max_bytes: usize,
    split: bool,
}

enum Planned {
    /// Served from the cache of newest records.
    Done(ReadChunk),
    /// The blocks holding the read, from the one holding `from` on, and the cached records
    /// from the first block the cache holds whole (those are not read from disk).
    Disk {
        blocks: Vec<Block>,
        cached: Vec<(u64, Bytes)>,
    },
}

/// Where `[from, until)` is now: in the cache of newest records, or in which blocks.
fn plan(shared: &LogShared, q: &Query) -> Result<Planned, StorageError> {
    let index = shared.index.read();
    if q.from < index.released && index.released > shared.start() {
        return Err(StorageError::Released {
            start: index.released,
        });
    }
    if let Some(chunk) = index.cache.read(q.from, q.until, q.max_bytes, q.split) {
        return chunk.map(Planned::Done);
    }
    // Blocks from the one holding `from`, until they hold the budget's worth (the read never
    // goes further) or reach `until`.
    let mut blocks = Vec::new();
    let mut have = 0u64;
    for b in index.blocks.list.range(index.blocks.find(q.from)..) {
        if b.start >= q.until || (have >= q.max_bytes as u64 && !blocks.is_empty()) {
            break;
        }
        have += b.end - b.start.max(q.from);
        blocks.push(*b);
    }
    let cache_from = index.cache.span().map(|(first, _)| first);
    let first_cached = blocks
        .iter()
        .find(|b| cache_from.is_some_and(|c| b.start >= c))
        .map(|b| b.start);
    let cached = match (first_cached, blocks.last()) {
        (Some(from), Some(last)) => index.cache.run(from, last.end),
        _ => Vec::new(),
    };
    drop(index);
    if blocks.is_empty() || first_cached == blocks.first().map(|b| b.start) {
        return finish(&cached, shared.start(), q).map(Planned::Done);
    }
    Ok(Planned::Disk { blocks, cached })
}

/// The read `q` served from `records`, consecutive records from the one holding `q.from` (or
/// the first after it) on, at least as many as the read takes.
fn finish(records: &[(u64, Bytes)], log_start: u64, q: &Query) -> Result<ReadChunk, StorageError> {
    let span = |i: usize| (records[i].0, records[i].1.len() as u64);
    let (pieces, end) = plan_read(
        records.len(),
        span,
        log_start,
        q.from,
        q.until,
        q.max_bytes,
        q.split,
    )?;
    Ok(ReadChunk {
        parts: pieces
            .iter()
            .map(|p| records[p.record].1.slice(p.skip..p.skip + p.len))
            .collect(),
        end,
    })
}

/// The records of `blocks` (blocking): the cached ones from `cached`, the others read from
/// disk, one `pread` per run of blocks close together in the same segment.
fn read_blocks(
    wal: &Wal,
    id: StreamId,
    blocks: &[Block],
    cached: Vec<(u64, Bytes)>,
    from: u64,
) -> Result<Vec<(u64, Bytes)>, StorageError> {
    /// Gap between blocks (other streams' frames) worth reading through rather than seeking.
    const MAX_GAP: u64 = 64 << 10;
    let cache_from = cached.first().map(|(start, _)| *start);
    let on_disk = |b: &Block| cache_from.is_none_or(|c| b.start < c);
    let mut records = Vec::new();
    let mut i = 0;
    while i < blocks.len() && on_disk(&blocks[i]) {
        let first = blocks[i];
        let mut run_end = first.off + u64::from(first.span);
        let mut j = i + 1;
        while let Some(b) = blocks.get(j) {
            if !on_disk(b) || b.seg != first.seg || b.off < run_end || b.off - run_end > MAX_GAP {
                break;
            }
            run_end = b.off + u64::from(b.span);
            j += 1;
        }
        let buf = wal.pread(first.seg, first.off, (run_end - first.off) as usize)?;
        for b in &blocks[i..j] {
            let at = (b.off - first.off) as usize;
            let span = buf.slice(at..at + b.span as usize);
            let found =
                blocks::scan(id, b, &span, from).map_err(|detail| StorageError::Corrupt {
                    what: format!(
                        "{} at byte {}",
                        wal::segment_path(wal.dir(), b.seg).display(),
                        b.off
                    ),
                    detail: format!("stream {id}: {detail}"),
                })?;
            records.extend(found);
        }
        i = j;
    }
    records.extend(cached);
    Ok(records)
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // The directory lock is released right after this: the writer thread must be finished
        // by then, or a new instance could recover the log while the old one still writes or
        // deletes segments.
        self.wal.shutdown();
    }
}

/// Where the WAL segments live under a data directory.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod size {
    /// Every stream's index is in RAM for as long as the stream exists: with the `Arc`'s two
    /// counters it must fit jemalloc's 192-byte size class (the next is 224). Before: 384, then
    /// 256 until the stream's metadata was shared with the stream layer.
    #[test]
    fn a_stream_index_fits_a_192_byte_allocation() {
        assert!(std::mem::size_of::<super::LogShared>() + 16 <= 192);
    }
}
