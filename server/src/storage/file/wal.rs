//! The writer thread: group commit over the shared segmented log.
//!
//! Callers submit encoded frames through a channel and await a oneshot. The thread takes
//! everything queued, writes it with one `write` at the end of the active segment, syncs once
//! (`file-durable`), updates the stream indexes, and then completes every operation of the batch
//! in submission order. Segment rotation and clean-up happen here too, so no lock guards the
//! segment table.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::blocks::{self, Block, MAX_BLOCK_RECORDS, MAX_BLOCK_SPAN};
use super::checkpoint;
use super::frame::{self, Encoded, LogPos};
use super::{FileOptions, LogShared};
use crate::storage::mapped;
use crate::storage::tail_cache::CacheBudget;
use crate::storage::{Commit, ProducerState, ProducerTuple, StorageError, ZERO_FILL_BELOW};

/// Most operations written in one batch.
const MAX_BATCH_OPS: usize = 4096;
/// Most bytes written in one batch (a single larger frame still goes alone).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// The active segment's file is extended this much at a time, ahead of the frames written into
/// it, with written zeros where that pays (in `file-durable`, for batches below
/// `storage::ZERO_FILL_BELOW`; a large batch, and `file-fast`, which never syncs, use
/// `ftruncate`). An append that moves the end of a file makes `fdatasync` write the inode as well as the data (a second I/O on ext4 without a
/// journal, a journal commit with one), and so does a write into a hole (`ftruncate`) or an
/// unwritten extent (`fallocate`), which allocates or converts blocks. Extending ahead with
/// real zeros makes most batches pure overwrites of allocated blocks, whose sync writes only
/// data: here 145 µs per small sync against 177 µs into a hole and about 330 µs at the end of
/// the file.
pub(crate) const GROW_STEP: u64 = 4 << 20;

/// How often an idle writer looks again at segments to rewrite forward or to delete (a
/// deletion in file-fast waits for the background sync).
const IDLE_CLEAN_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// What an operation does to the in-memory indexes once its frame is written.
pub(crate) enum Target {
    Create {
        log: Arc<LogShared>,
        data: Vec<Bytes>,
    },
    Append {
        log: Arc<LogShared>,
        start: u64,
        data: Option<Bytes>,
        /// Writer state the append changes (moved from the entry after encoding: no copy).
        change: Option<Box<StateChange>>,
    },
    SoftDelete(Arc<LogShared>),
    Remove(Arc<LogShared>),
    Release {
        log: Arc<LogShared>,
        before: u64,
    },
    /// A STATE frame the writer wrote forward (never submitted from outside), carrying the
    /// stream's retained records `[from, to)` when given: they replace the blocks that held
    /// them.
    State {
        log: Arc<LogShared>,
        moved: Option<(u64, u64)>,
    },
}

/// The writer-state part of an append, kept in the stream's [`super::Mirror`].
pub(crate) struct StateChange {
    pub close: Option<Option<ProducerTuple>>,
    pub stream_seq: Option<String>,
    pub producer: Option<(String, ProducerState)>,
}

pub(crate) struct Op {
    pub frame: Encoded,
    pub target: Target,
}

struct Pending {
    op: Op,
    done: oneshot::Sender<Result<(), StorageError>>,
}

/// A segment as the writer tracks it.
#[derive(Clone, Default)]
pub(crate) struct Segment {
    pub id: u32,
    /// Streams (not removed) whose state needs a frame here (see [`super::Index::touched`]).
    pub live: u64,
    /// Bytes of retained records here. A segment is deleted once both are 0.
    pub retained: u64,
    /// Bytes in the file (the append position for the active segment).
    pub len: u64,
    /// Streams that have had a frame here (some may have been removed or unpinned it since).
    /// These lists are the writer's only reference to its streams: every live stream is in
    /// the list of its base segment (the first of its `touched`), which is how a checkpoint
    /// finds them all. (A map of every stream by id beside them took another 25-35 bytes per
    /// stream.)
    pub streams: Vec<Arc<LogShared>>,
    /// Streams in `streams` removed since it was last compacted: once they are half of it,
    /// it is compacted, so that removed streams do not stay in RAM until the segment goes.
    pub removed: usize,
    /// Rewriting this segment forward was refused as too costly at these `(live, retained)`;
    /// tried again once either falls.
    pub refused_at: Option<(u64, u64)>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("id", &self.id)
            .field("live", &self.live)
            .field("retained", &self.retained)
            .field("len", &self.len)
            .field("streams", &self.streams.len())
            .field("refused_at", &self.refused_at)
            .finish()
    }
}

pub(crate) struct Wal {
    dir: PathBuf,
    durable: bool,
    tx: Mutex<Option<mpsc::Sender<Pending>>>,
    /// Set after a failed write or background sync: the log's tail (or what is on disk) is
    /// unknown until restart.
    failed: Arc<AtomicBool>,
    /// Open segment files for reads, bounded by `max_open_files`.
    readers: Mutex<mapped::Open>,
    pub(crate) cache: CacheBudget,
    read_buffers: Arc<read_buffers::Pool>,
    /// Reads map the segment rather than copy it (`DS_STORAGE__MAP_READS`).
    map_reads: bool,
    /// A mapping covers at least this much of a segment (its size when full).
    segment_bytes: u64,
    batches: AtomicU64,
    ops: AtomicU64,
    /// Time spent in `write` + `fdatasync` of batches, µs.
    write_micros: AtomicU64,
    writer: ThreadSlot,
    /// `file-fast`: the background sync and its thread.
    syncer: Option<(Arc<syncer::Syncer>, ThreadSlot)>,
}

/// A background thread's handle, taken when it is joined.
type ThreadSlot = Mutex<Option<std::thread::JoinHandle<()>>>;

pub fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.seg"))
}

pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StorageError::Io {
            what: dir.display().to_string(),
            source,
        })
}

fn spawn(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, StorageError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| StorageError::Io {
            what: format!("thread {name}"),
            source,
        })
}

fn io_err(what: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        what: what.display().to_string(),
        source,
    }
}

impl Wal {
    /// Starts the writer thread over the recovered segments (ascending; the last is active).
    #[allow(clippy::too_many_arguments)] // what recovery found, field by field
    pub fn start(
        dir: PathBuf,
        options: FileOptions,
        mut segments: Vec<Segment>,
        last_batch: u64,
        newest_is_current: bool,
        streams: Vec<Arc<LogShared>>,
        last_batch_at: Option<LogPos>,
        checkpoint_seg: Option<u32>,
        replayed: u64,
    ) -> Result<Arc<Wal>, StorageError> {
        // Batches go only into segments of this build's format: after an upgrade the older
        // newest segment is left as it is and a new one is started.
        if segments.is_empty() || !newest_is_current {
            let next = segments.last().map_or(1, |s| s.id + 1);
            segments.push(create_segment(&dir, next, options.durable)?);
        }
        let active = segments.last().map(|s| s.id).unwrap_or(1);
        let path = segment_path(&dir, active);
        let file = Arc::new(
            File::options()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?,
        );
        let (tx, rx) = mpsc::channel::<Pending>();
        let failed = Arc::new(AtomicBool::new(false));
        // file-fast: what recovery read may be only in the page cache (after a `kill -9`), so
        // it is synced once here; the durable mark starts at its end.
        let syncer = if options.durable {
            None
        } else {
            for seg in &segments {
                let path = segment_path(&dir, seg.id);
                File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(io_err(&path))?;
            }
            sync_dir(&dir)?;
            let end = segments.last().map_or(frame::SEGMENT_HEADER_LEN, |s| s.len);
            Some(Arc::new(syncer::Syncer::new((active, end), failed.clone())))
        };
        let wal = Arc::new(Wal {
            dir: dir.clone(),
            durable: options.durable,
            tx: Mutex::new(Some(tx)),
            failed: failed.clone(),
            readers: Mutex::new(mapped::Open::new(options.max_open_files.max(1))),
            cache: CacheBudget::new(options.cache_bytes),
            read_buffers: Arc::new(read_buffers::Pool::default()),
            map_reads: options.map_reads,
            segment_bytes: options.segment_bytes,
            batches: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            write_micros: AtomicU64::new(0),
            writer: Mutex::new(None),
            syncer: syncer.clone().map(|s| (s, Mutex::new(None))),
        });
        let mut writer = Writer {
            wal: Arc::downgrade(&wal),
            dir,
            durable: options.durable,
            segment_bytes: options.segment_bytes.max(frame::SEGMENT_HEADER_LEN + 1),
            segments,
            allocated: file.metadata().map_err(io_err(&path))?.len(),
            file,
            next_batch: last_batch + 1,
            failed: failed.clone(),
            last_batch_at,
            checkpoint_seg,
            // What start-up replayed counts: a long replay is followed by a checkpoint soon.
            since_checkpoint: replayed,
            checkpoint_len: 0,
            pending: None,
            checkpointer: checkpoint::Background::default(),
            syncer,
            clean_after: None,
            reclaim: true,
            state_total: 0,
        };
        for log in streams {
            let mut index = log.index.write();
            for &seg in &index.touched {
                if let Some(s) = writer.segment_mut(seg) {
                    s.live += 1;
                    s.streams.push(log.clone());
                }
            }
            for b in index.blocks.iter() {
                if let Some(s) = writer.segment_mut(b.seg) {
                    s.retained += b.bytes();
                }
            }
            writer.unpin(&mut index);
            // Recovery always names the base among the segments touched; without it the stream
            // would be in no segment's list, and the next checkpoint would leave it out.
            if index.touched.is_empty() {
                let base = index.base;
                writer.touch(&mut index, &log, base);
            }
            index.state_len = estimate_state_len(&log.meta, &index.mirror);
            writer.state_total += u64::from(index.state_len);
        }
        *wal.writer.lock() = Some(spawn("ds-wal-writer", move || writer.run(rx))?);
        if let Some((syncer, slot)) = &wal.syncer {
            let syncer = syncer.clone();
            let interval = options.fast_sync_interval;
            *slot.lock() = Some(spawn("ds-wal-sync", move || syncer.run(interval))?);
        }
        Ok(wal)
    }

    pub fn durable(&self) -> bool {
        self.durable
    }

    /// The directory of the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.ops.load(Ordering::Relaxed),
        )
    }

    /// Queues an operation; the future resolves once it is acknowledged.
    pub fn submit(&self, op: Op) -> Commit {
        if self.failed.load(Ordering::Relaxed) {
            return Box::pin(std::future::ready(Err(StorageError::Corrupt {
                what: self.dir.display().to_string(),
                detail: "an earlier write failed; restart to recover".into(),
            })));
        }
        let (done, rx) = oneshot::channel();
        let sent = self
            .tx
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.send(Pending { op, done }).is_ok());
        if !sent {
            return Box::pin(std::future::ready(Err(StorageError::ShuttingDown)));
        }
        Box::pin(async move { rx.await.unwrap_or(Err(StorageError::ShuttingDown)) })
    }

    /// Reads `len` bytes at `off` of segment `seg` (blocking): the page cache's pages if reads
    /// are mapped (see `mapped`), else a copy in a (pooled) buffer.
    pub fn pread(&self, seg: u32, off: u64, len: usize) -> Result<Bytes, StorageError> {
        let path = || segment_path(&self.dir, seg);
        let file = {
            let mut readers = self.readers.lock();
            match readers.get(u64::from(seg)) {
                Some(f) => f,
                None => {
                    let p = path();
                    let f = Arc::new(mapped::Segment::new(File::open(&p).map_err(io_err(&p))?));
                    readers.insert(u64::from(seg), f.clone());
                    f
                }
            }
        };
        let failed = |source| StorageError::Io {
            what: format!("{} at {off}", path().display()),
            source,
        };
        if self.map_reads {
            return file.mapped(off, len, self.segment_bytes).map_err(failed);
        }
        let mut buf = self.read_buffers.take(len);
        file.read_into(&mut buf, off).map_err(failed)?;
        Ok(self.read_buffers.share(buf))
    }
}

impl Wal {
    /// Stops accepting operations and waits until the writer has written, acknowledged and
    /// cleaned up everything queued. Later submissions fail with `ShuttingDown`.
    pub fn shutdown(&self) {
        // Closing the channel ends the writer after it has written everything queued.
        self.tx.lock().take();
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            // The writer itself may drop the last reference while it applies a batch.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
            let (batches, ops) = self.stats();
            tracing::info!(
                batches,
                operations = ops,
                ops_per_batch = format!("{:.1}", ops as f64 / batches.max(1) as f64),
                write_us_per_batch = self.write_micros.load(Ordering::Relaxed) / batches.max(1),
                "write-ahead log closed"
            );
        }
        // file-fast: a last sync, so a clean shutdown leaves everything on disk.
        if let Some((syncer, slot)) = &self.syncer {
            syncer.stop();
            let handle = slot.lock().take();
            if let Some(handle) = handle
                && handle.thread().id() != std::thread::current().id()
            {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn create_segment(dir: &Path, id: u32, durable: bool) -> Result<Segment, StorageError> {
    let path = segment_path(dir, id);
    let file = File::options()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    crate::storage::fsutil::crash_point("file-segment-created");
    file.write_all_at(&frame::segment_header(), 0)
        .map_err(io_err(&path))?;
    if durable {
        file.sync_all().map_err(io_err(&path))?;
        sync_dir(dir)?;
    }
    Ok(Segment {
        id,
        len: frame::SEGMENT_HEADER_LEN,
        ..Segment::default()
    })
}

struct Writer {
    /// Weak, so that dropping the storage ends the thread.
    wal: std::sync::Weak<Wal>,
    dir: PathBuf,
    durable: bool,
    segment_bytes: u64,
    /// Ascending by id; the last one is active.
    segments: Vec<Segment>,
    file: Arc<File>,
    /// The active segment file's length: past the last frame, zeros.
    allocated: u64,
    /// The sequence number of the next batch's BATCH frame.
    next_batch: u64,
    /// The log's failure flag: no checkpoint once a write failed.
    failed: Arc<AtomicBool>,
    /// Where the last batch's BATCH frame is.
    last_batch_at: Option<LogPos>,
    /// The segment in which the checkpoint on disk starts replay, if there is one: never
    /// deleted before a newer checkpoint replaces it.
    checkpoint_seg: Option<u32>,
    /// Bytes written to the log since that checkpoint.
    since_checkpoint: u64,
    /// Its size: checkpoints are spaced by a multiple of it, so writing them costs a bounded
    /// share of what is written.
    checkpoint_len: u64,
    /// file-fast: a checkpoint taken, written once the background sync has passed its point.
    pending: Option<checkpoint::Checkpoint<checkpoint::Taken>>,
    /// The thread that encodes, writes and syncs checkpoints, so that appends do not wait for
    /// them (at a million streams one is ~260 MB and took 1.4 s on this writer thread). At most
    /// one is in flight; its result is applied before a segment it might need is deleted.
    checkpointer: checkpoint::Background,
    /// `file-fast`: the background sync, told what is written and asked what is durable.
    syncer: Option<Arc<syncer::Syncer>>,
    /// Segments may have died (every stream in them removed) once the log up to here is
    /// durable. In file-fast the REMOVE frames that kill a segment are not synced when written,
    /// so its file is deleted only after the background sync has passed them: a power loss
    /// must never keep a deletion and lose what allowed it.
    clean_after: Option<LogPos>,
    /// Something changed that may let the oldest segment go (a release, a removal, a rotation).
    reclaim: bool,
    /// What every stream's state would take in STATE frames (estimated), for the live bytes.
    state_total: u64,
}

/// A stream's whole state as a STATE frame (write-forward) carries it: its metadata, tail,
/// retained start, close and producers (sorted, so equal states encode alike). A checkpoint
/// carries the same (`checkpoint::Taken`).
fn stream_state(log: &LogShared, index: &super::Index) -> frame::StreamState {
    let m = &index.mirror;
    let mut producers: Vec<(String, ProducerState)> = m
        .producers
        .iter()
        .map(|(k, v)| (k.to_owned(), *v))
        .collect();
    producers.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    frame::StreamState {
        meta: crate::storage::StreamMeta::clone(&log.meta),
        tail: m.tail,
        released: index.released,
        closed: m.closed,
        closed_by: m.closed_by.as_deref().cloned(),
        last_seq: m.last_seq.as_deref().map(str::to_owned),
        producers,
        soft_deleted: m.soft_deleted,
        moved_from: 0,
    }
}

/// About what a STATE frame of this stream takes, without encoding it.
fn estimate_state_len(meta: &crate::storage::StreamMeta, m: &super::Mirror) -> u32 {
    let producers: usize = m.producers.iter().map(|(id, _)| id.len() + 48).sum();
    (256 + meta.path.len() + meta.content_type.len() + producers) as u32
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Pending>) {
        self.serve(rx);
        self.checkpoint_written(true);
        // A clean shutdown leaves a checkpoint of everything, so the next start replays nothing.
        if (self.since_checkpoint > 0 || self.pending.is_some())
            && !self.failed.load(Ordering::Relaxed)
        {
            self.checkpoint_or_warn(true);
            self.checkpoint_written(true);
        }
    }

    fn serve(&mut self, rx: mpsc::Receiver<Pending>) {
        // Reused: growing a new vector through every batch is an allocation per doubling.
        let mut batch: Vec<Pending> = Vec::with_capacity(64);
        loop {
            // file-fast: a clean-up waiting for the background sync is retried while idle, so
            // dead segments go without waiting for the next write.
            let first = if self.clean_after.is_some() || self.reclaim || self.pending.is_some() {
                match rx.recv_timeout(IDLE_CLEAN_TICK) {
                    Ok(first) => first,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Some(wal) = self.wal.upgrade() {
                            self.idle(&wal);
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            };
            batch.push(first);
            let mut bytes = frame::BATCH_FRAME_LEN + batch[0].op.frame.bytes.len();
            while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(p) => {
                        bytes += p.op.frame.bytes.len();
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            let Some(wal) = self.wal.upgrade() else {
                break;
            };
            let started = std::time::Instant::now();
            match self.write_batch(&wal, &batch, bytes) {
                Ok(placed) => {
                    wal.write_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    wal.batches.fetch_add(1, Ordering::Relaxed);
                    wal.ops.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    crate::metrics::storage_batch(batch.len());
                    let mut freed_any = false;
                    for (p, (seg, off)) in batch.drain(..).zip(placed) {
                        freed_any |=
                            matches!(p.op.target, Target::Remove(_) | Target::Release { .. });
                        self.apply(&wal, p.op, seg, off);
                        let _ = p.done.send(Ok(()));
                    }
                    if freed_any {
                        self.request_clean();
                        self.reclaim = true;
                    }
                    self.idle(&wal);
                }
                Err(e) => {
                    tracing::error!(error = %e, "write-ahead log write failed; refusing writes until restart");
                    wal.failed.store(true, Ordering::Relaxed);
                    for p in batch.drain(..) {
                        let _ = p.done.send(Err(StorageError::Corrupt {
                            what: self.dir.display().to_string(),
                            detail: format!("write failed: {e}"),
                        }));
                    }
                }
            }
        }
    }

    /// Writes the batch (`bytes` long, with its BATCH frame) at the end of the active segment;
    /// returns where each frame landed. Recovery relies on the order kept here: in
    /// `file-durable` a batch is written only after the previous one is synced, and the BATCH
    /// frame's durable mark says so (`recover::vouched`).
    fn write_batch(
        &mut self,
        wal: &Wal,
        batch: &[Pending],
        bytes: usize,
    ) -> Result<Vec<(u32, u64)>, StorageError> {
        if let Some(active) = self.segments.last()
            && active.len > frame::SEGMENT_HEADER_LEN
            && active.len + bytes as u64 > self.segment_bytes
        {
            self.rotate(wal)?;
        }
        let Some(active) = self.segments.last_mut() else {
            return Err(StorageError::ShuttingDown);
        };
        let mut buf = Vec::with_capacity(bytes);
        let frames_len = (bytes - frame::BATCH_FRAME_LEN) as u32;
        // Everything before this batch is durable in file-durable (each batch is synced before
        // the next is written); in file-fast, what the syncer last synced.
        let durable = match &self.syncer {
            None => (active.id, active.len),
            Some(syncer) => syncer.durable(),
        };
        buf.extend_from_slice(&frame::encode_batch(self.next_batch, frames_len, durable));
        let mut placed = Vec::with_capacity(batch.len());
        for p in batch {
            placed.push((active.id, active.len + buf.len() as u64));
            buf.extend_from_slice(&p.op.frame.bytes);
        }
        debug_assert_eq!(
            buf.len(),
            bytes,
            "the BATCH frame's length must match its frames"
        );
        let path = segment_path(&self.dir, active.id);
        let end = active.len + buf.len() as u64;
        if end > self.allocated {
            // Never far past a small configured segment.
            let step = GROW_STEP.min(self.segment_bytes.next_multiple_of(4096));
            let grown = end.next_multiple_of(step);
            if self.durable && (buf.len() as u64) < ZERO_FILL_BELOW {
                // Zeros from where this batch ends: the batch itself fills the rest.
                let from = self.allocated.max(end);
                let zeros = vec![0u8; (grown - from) as usize];
                self.file
                    .write_all_at(&zeros, from)
                    .map_err(io_err(&path))?;
            } else {
                self.file.set_len(grown).map_err(io_err(&path))?;
            }
            self.allocated = grown;
        }
        self.file
            .write_all_at(&buf, active.len)
            .map_err(io_err(&path))?;
        if self.durable {
            let syncing = std::time::Instant::now();
            self.file.sync_data().map_err(io_err(&path))?;
            crate::metrics::storage_sync(syncing.elapsed());
        }
        self.last_batch_at = Some((active.id, active.len));
        active.len += buf.len() as u64;
        self.next_batch += 1;
        self.since_checkpoint += buf.len() as u64;
        if let Some(syncer) = &self.syncer {
            syncer.written(&self.file, (active.id, active.len));
        }
        Ok(placed)
    }

    fn rotate(&mut self, wal: &Wal) -> Result<(), StorageError> {
        let next = self.segments.last().map_or(1, |s| s.id + 1);
        // Synced in file-fast too (once per segment): a power loss must not leave a segment
        // whose size reached the disk and whose header did not.
        let seg = create_segment(&self.dir, next, true)?;
        let path = segment_path(&self.dir, next);
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let old = std::mem::replace(&mut self.file, Arc::new(file));
        if let Some(syncer) = &self.syncer {
            syncer.rotated(old);
        }
        self.allocated = seg.len;
        self.segments.push(seg);
        self.reclaim = true;
        // The old active segment may already be clean (everything in it removed).
        self.request_clean();
        self.clean_when_durable(wal)
    }

    /// After each batch, and every [`IDLE_CLEAN_TICK`] while no operation comes: rewrites the
    /// oldest segment forward if that is due, and deletes what is dead (once durable). A failed
    /// rewrite is a failed write: the log's end is unknown until a restart.
    fn idle(&mut self, wal: &Wal) {
        if self.reclaim
            && !wal.failed.load(Ordering::Relaxed)
            && let Err(e) = self.forward(wal)
        {
            tracing::error!(error = %e, "writing stream states forward failed; refusing writes until restart");
            wal.failed.store(true, Ordering::Relaxed);
        }
        if let Err(e) = self.clean_when_durable(wal) {
            tracing::warn!(error = %e, "segment clean-up failed");
        }
        if self.since_checkpoint
            >= self
                .segment_bytes
                .max(CHECKPOINT_SPACING * self.checkpoint_len)
            && self.pending.is_none()
            && !wal.failed.load(Ordering::Relaxed)
        {
            self.checkpoint_or_warn(false);
        }
        self.checkpoint_written(false);
        self.write_pending_checkpoint(false);
    }

    /// Asks for a clean-up once everything written so far is durable.
    fn request_clean(&mut self) {
        let end = self.segments.last().map_or((0, 0), |s| (s.id, s.len));
        self.clean_after = Some(self.clean_after.map_or(end, |p| p.max(end)));
    }

    /// Runs a requested clean-up if what asked for it is durable (always, in file-durable).
    fn clean_when_durable(&mut self, wal: &Wal) -> Result<(), StorageError> {
        let Some(after) = self.clean_after else {
            return Ok(());
        };
        if let Some(syncer) = &self.syncer
            && syncer.durable() < after
        {
            return Ok(());
        }
        self.clean_after = None;
        self.clean_segments(wal)
    }

    fn segment_mut(&mut self, seg: u32) -> Option<&mut Segment> {
        let at = self.segments.binary_search_by_key(&seg, |s| s.id).ok()?;
        self.segments.get_mut(at)
    }

    fn touch(&mut self, index: &mut super::Index, log: &Arc<LogShared>, seg: u32) {
        if index.touched.last() != Some(&seg) {
            index.touched.push(seg);
            if let Some(s) = self.segment_mut(seg) {
                s.live += 1;
                s.streams.push(log.clone());
            }
        }
    }

    /// Stops pinning the segments before the stream's base (its newest CREATE or STATE frame):
    /// recovery needs no frame of it from there. Its retained records keep their segments
    /// through `Segment::retained`.
    fn unpin(&mut self, index: &mut super::Index) {
        let n = index
            .touched
            .iter()
            .take_while(|&&s| s < index.base)
            .count();
        for seg in index.touched.drain(..n).collect::<Vec<_>>() {
            if let Some(s) = self.segment_mut(seg) {
                s.live = s.live.saturating_sub(1);
            }
        }
    }

    fn retain(&mut self, seg: u32, len: u64) {
        if let Some(s) = self.segment_mut(seg) {
            s.retained += len;
        }
    }

    fn unretain(&mut self, seg: u32, len: u64) {
        if let Some(s) = self.segment_mut(seg) {
            s.retained = s.retained.saturating_sub(len);
        }
    }

    fn apply(&mut self, wal: &Wal, op: Op, seg: u32, frame_off: u64) {
        let records = op.frame.records;
        let frame_len = op.frame.bytes.len();
        match op.target {
            Target::Create { log, data } => {
                let mut index = log.index.write();
                index.base = seg;
                self.touch(&mut index, &log, seg);
                let count = records.len() as u32;
                let mut pos = log.start();
                let mut data_len = 0;
                for ((_, len), bytes) in records.into_iter().zip(data) {
                    index.cache.push(pos, Some(bytes), &wal.cache);
                    pos += len as u64;
                    data_len += len + 4;
                }
                if count > 0 {
                    index.blocks.list.push_back(Block {
                        start: log.start(),
                        end: pos,
                        off: frame_off,
                        span: frame_len as u32,
                        seg,
                        count,
                        packed: true,
                    });
                    self.retain(seg, pos - log.start());
                }
                index.mirror.tail = pos;
                index.state_len = (frame_len - data_len + 64) as u32;
                self.state_total += u64::from(index.state_len);
            }
            Target::Append {
                log,
                start,
                data,
                change,
            } => {
                let mut index = log.index.write();
                self.touch(&mut index, &log, seg);
                if let Some((_, len)) = records.first().copied() {
                    let len = len as u64;
                    index
                        .blocks
                        .push_append(start, len, seg, frame_off, frame_len as u64);
                    self.retain(seg, len);
                    index.cache.push(start, data, &wal.cache);
                    index.mirror.tail = start + len;
                }
                if let Some(change) = change {
                    let m = &mut index.mirror;
                    if let Some(by) = change.close {
                        m.closed = true;
                        m.closed_by = by.map(Box::new);
                    }
                    if let Some(seq) = change.stream_seq {
                        m.last_seq = Some(seq.into());
                    }
                    if let Some((id, ps)) = change.producer {
                        let grew = id.len() as u32 + 48;
                        if m.producers.insert(id, ps) {
                            index.state_len += grew;
                            self.state_total += u64::from(grew);
                        }
                    }
                }
            }
            Target::SoftDelete(log) => {
                let mut index = log.index.write();
                index.mirror.soft_deleted = true;
                self.touch(&mut index, &log, seg);
            }
            Target::Release { log, before } => {
                let mut index = log.index.write();
                if index.removed || before <= index.released {
                    return;
                }
                index.released = before;
                index
                    .blocks
                    .drop_released(before, |b| self.unretain(b.seg, b.bytes()));
                index.cache.drop_before(before, &wal.cache);
                self.touch(&mut index, &log, seg);
            }
            Target::State { log, moved } => {
                let mut index = log.index.write();
                index.base = seg;
                // The moved records now live in this frame.
                if let Some((from, to)) = moved
                    && !records.is_empty()
                {
                    let block = Block {
                        start: from,
                        end: to,
                        off: frame_off,
                        span: frame_len as u32,
                        seg,
                        count: records.len() as u32,
                        packed: true,
                    };
                    let replaced = index
                        .blocks
                        .replace(block, |b| self.unretain(b.seg, b.bytes()));
                    match replaced {
                        Ok(()) => self.retain(seg, to - from),
                        Err(e) => {
                            tracing::error!(stream = log.id(), error = %e, "moved records do not match the index")
                        }
                    }
                }
                self.touch(&mut index, &log, seg);
                self.unpin(&mut index);
            }
            Target::Remove(log) => {
                let mut index = log.index.write();
                index.removed = true;
                index.clear_cache(&wal.cache);
                for b in std::mem::take(&mut index.blocks.list) {
                    self.unretain(b.seg, b.bytes());
                }
                // What only a live stream needs goes now; the rest once no segment lists it.
                index.mirror.producers = super::Producers::default();
                index.mirror.last_seq = None;
                index.mirror.closed_by = None;
                self.state_total = self.state_total.saturating_sub(u64::from(index.state_len));
                let touched = std::mem::take(&mut index.touched);
                drop(index);
                for seg in touched {
                    if let Some(s) = self.segment_mut(seg) {
                        s.live = s.live.saturating_sub(1);
                        s.removed += 1;
                        if s.removed * 2 > s.streams.len() {
                            s.streams.retain(|l| !l.index.read().removed);
                            s.removed = 0;
                        }
                    }
                }
            }
        }
    }

    /// Rewrites the oldest segment forward, so that it can be deleted: for every stream that
    /// still needs it, a STATE frame with the stream's whole state and the retained records it
    /// holds there (one frame per run of consecutive records). Done when that takes at most
    /// half the segment's bytes, so a rewrite never writes more than it frees; and, whatever it takes, while the log is more than twice its live bytes plus
    /// two segments: one stream that is never released must not keep every later segment (they
    /// go oldest first) on the disk. That is the slack bound: the log stays within about twice
    /// the live bytes (retained records and states) plus three segments.
    fn forward(&mut self, wal: &Wal) -> Result<(), StorageError> {
        self.reclaim = false;
        // The oldest segment that still holds something (older ones only wait for their
        // deletion to be durable), never the active one.
        let Some(at) = self.segments[..self.segments.len().saturating_sub(1)]
            .iter()
            .position(|s| s.live > 0 || s.retained > 0)
        else {
            return Ok(());
        };
        let (oldest, live, retained, len) = {
            let s = &self.segments[at];
            (s.id, s.live, s.retained, s.len)
        };
        // The dead segments before `at` only wait for their deletion (in file-fast, for the
        // background sync): rewriting more cannot free them, and counting them made an idle
        // file-fast writer rewrite forward on every tick, each batch pushing the awaited sync
        // further away.
        let total_len: u64 = self.segments[at..].iter().map(|s| s.len).sum();
        let total_live: u64 =
            self.segments.iter().map(|s| s.retained).sum::<u64>() + self.state_total;
        let pressed = total_len > 2 * total_live + 2 * self.segment_bytes;
        let budget = len / 2;
        if !pressed {
            if retained > budget {
                return Ok(());
            }
            if let Some((l, r)) = self.segments[at].refused_at
                && live >= l
                && retained >= r
            {
                return Ok(());
            }
        }
        let mut forward = Vec::new();
        let mut bytes = frame::BATCH_FRAME_LEN;
        let mut seen = std::collections::HashSet::new();
        let logs = self.segments[at].streams.clone();
        for log in logs {
            let id = log.id();
            if !seen.insert(id) {
                continue;
            }
            let index = log.index.read();
            if index.removed {
                continue;
            }
            let needs_state = index.touched.first() == Some(&oldest);
            // Runs of consecutive blocks in the oldest segment, each at most a block's worth.
            let mut runs: Vec<Vec<Block>> = Vec::new();
            if retained > 0 {
                for b in index.blocks.iter().filter(|b| b.seg == oldest) {
                    match runs.last_mut() {
                        Some(run)
                            if run.last().is_some_and(|l| l.end == b.start)
                                && run.iter().map(|x| x.count).sum::<u32>() + b.count
                                    <= MAX_BLOCK_RECORDS
                                && run.iter().map(Block::bytes).sum::<u64>() + b.bytes()
                                    <= MAX_BLOCK_SPAN =>
                        {
                            run.push(*b)
                        }
                        _ => runs.push(vec![*b]),
                    }
                }
            }
            let released = index.released;
            if !needs_state && runs.is_empty() {
                continue;
            }
            let mut state = stream_state(&log, &index);
            drop(index);
            if runs.is_empty() {
                runs.push(Vec::new());
            }
            for run in runs {
                // The run's records, less those released (a block may start before the
                // retained start).
                let mut data = Vec::new();
                let mut from = None;
                for b in &run {
                    let span = wal.pread(b.seg, b.off, b.span as usize)?;
                    let found = blocks::scan(id, b, &span, released).map_err(|detail| {
                        StorageError::Corrupt {
                            what: format!(
                                "{} at byte {}",
                                segment_path(&self.dir, b.seg).display(),
                                b.off
                            ),
                            detail: format!("stream {id}: {detail}"),
                        }
                    })?;
                    for (start, bytes) in found {
                        if start + bytes.len() as u64 > released {
                            from.get_or_insert(start);
                            data.push(bytes);
                        }
                    }
                }
                state.moved_from = from.unwrap_or(0);
                let encoded = frame::encode_state(&state, &data);
                bytes += encoded.bytes.len();
                forward.push(Op {
                    frame: encoded,
                    target: Target::State {
                        log: log.clone(),
                        moved: from.zip(run.last().map(|b| b.end)),
                    },
                });
            }
        }
        if forward.is_empty() {
            return Ok(());
        }
        if !pressed && bytes as u64 > budget {
            self.segments[at].refused_at = Some((live, retained));
            tracing::debug!(
                segment = oldest,
                bytes,
                "not rewriting the oldest segment forward: it would take more than half of it"
            );
            return Ok(());
        }
        let batch: Vec<Pending> = forward
            .into_iter()
            .map(|op| Pending {
                op,
                done: oneshot::channel().0,
            })
            .collect();
        let placed = self.write_batch(wal, &batch, bytes)?;
        wal.batches.fetch_add(1, Ordering::Relaxed);
        for (p, (seg, off)) in batch.into_iter().zip(placed) {
            if let Target::State { log, .. } = &p.op.target {
                let new_len = (p.op.frame.bytes.len()
                    - p.op.frame.records.iter().map(|(_, l)| l + 4).sum::<usize>())
                    as u32;
                let mut index = log.index.write();
                self.state_total = self.state_total.saturating_sub(u64::from(index.state_len))
                    + u64::from(new_len);
                index.state_len = new_len;
            }
            self.apply(wal, p.op, seg, off);
        }
        self.request_clean();
        // The next segment may be ready too: look again after the next batch, or when idle.
        self.reclaim = true;
        Ok(())
    }

    /// Deletes the oldest segments while nothing live is in them (never the active one).
    fn clean_segments(&mut self, wal: &Wal) -> Result<(), StorageError> {
        let mut deleted = false;
        while self.segments.len() > 1
            && self.segments[0].live == 0
            && self.segments[0].retained == 0
        {
            // A checkpoint that replays from this segment: a newer one first (or none).
            if deleted {
                sync_dir(&self.dir)?;
            }
            self.before_deleting(self.segments[0].id)?;
            let seg = self.segments.remove(0);
            let path = segment_path(&self.dir, seg.id);
            wal.readers.lock().remove(u64::from(seg.id));
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Writer {
    /// Takes a checkpoint of every stream as of the end of the log, and writes it once the log
    /// up to there is durable: now in file-durable (and with `sync`, which syncs file-fast's log
    /// first: at shutdown), else when file-fast's background sync has passed it
    /// ([`Writer::write_pending_checkpoint`]), so checkpoints never sync file-fast's log
    /// sooner than its own rhythm. A failure is logged: the older checkpoint, if any, stays
    /// valid and the next start replays more.
    fn checkpoint_or_warn(&mut self, sync: bool) {
        let Some(c) = self.snapshot() else {
            return;
        };
        self.since_checkpoint = 0;
        if let (Some(syncer), true) = (&self.syncer, sync)
            && let Err(e) = syncer.sync_now()
        {
            tracing::warn!(error = %e, "writing a checkpoint failed");
            return;
        }
        self.pending = Some(c);
        self.write_pending_checkpoint(sync);
    }

    /// Hands the checkpoint taken last to the checkpoint thread if the log it covers is durable
    /// and none is in flight (else it stays pending).
    fn write_pending_checkpoint(&mut self, synced: bool) {
        let Some(from) = self.pending.as_ref().map(|c| c.from) else {
            return;
        };
        if let Some(syncer) = &self.syncer
            && !synced
            && syncer.durable() < from
        {
            return;
        }
        if self.checkpointer.in_flight() {
            return;
        }
        let Some(c) = self.pending.take() else {
            return;
        };
        self.checkpointer.start(&self.dir, c);
    }

    /// Applies the in-flight checkpoint's outcome once it is written (with `wait`, waits for
    /// it): from then on the log from its segment on is what recovery needs.
    fn checkpoint_written(&mut self, wait: bool) {
        match self.checkpointer.outcome(wait) {
            Some((from, Ok(len))) => {
                self.checkpoint_seg = Some(from);
                self.checkpoint_len = len as u64;
            }
            Some((_, Err(e))) => tracing::warn!(error = %e, "writing a checkpoint failed"),
            None => {}
        }
    }

    /// Every stream's state and blocks as of the end of the log (`None` before any batch).
    fn snapshot(&self) -> Option<checkpoint::Checkpoint<checkpoint::Taken>> {
        let last_batch_at = self.last_batch_at?;
        let (active, older) = self.segments.split_last()?;
        // Every live stream is in the list of the first segment it touched (its base), once.
        let mut streams: Vec<checkpoint::Taken> = Vec::new();
        for seg in &self.segments {
            for log in &seg.streams {
                let index = log.index.read();
                if !index.removed && index.touched.first() == Some(&seg.id) {
                    streams.push(checkpoint::Taken::of(log, &index));
                }
            }
        }
        streams.sort_unstable_by_key(checkpoint::Taken::id);
        streams.dedup_by_key(|t| t.id());
        Some(checkpoint::Checkpoint {
            from: (active.id, active.len),
            last_batch: self.next_batch - 1,
            last_batch_at,
            segments: older.iter().map(|s| (s.id, s.len)).collect(),
            streams,
        })
    }

    /// Before deleting segment `seg`: a checkpoint whose replay starts there (on disk, or
    /// waiting for the background sync) would be stale without it. file-durable writes a
    /// newer one first; file-fast removes it (the next start replays the whole log until the
    /// next checkpoint is written) rather than sync ahead of its rhythm.
    fn before_deleting(&mut self, seg: u32) -> Result<(), StorageError> {
        // A checkpoint being written may replay from this segment: it lands (or fails) first.
        self.checkpoint_written(true);
        if self.pending.as_ref().is_some_and(|c| c.from.0 <= seg) {
            self.pending = None;
            self.since_checkpoint = self.since_checkpoint.max(1);
        }
        if self.checkpoint_seg.is_none_or(|c| c > seg) {
            return Ok(());
        }
        if self.syncer.is_none() {
            let c = self.snapshot();
            if let Some(c) = c {
                let len = checkpoint::write(&self.dir, &c)?;
                self.checkpoint_seg = Some(c.from.0);
                self.checkpoint_len = len as u64;
                self.since_checkpoint = 0;
                return Ok(());
            }
        }
        let path = checkpoint::path(&self.dir);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.checkpoint_seg = None;
        self.since_checkpoint = self.since_checkpoint.max(1);
        Ok(())
    }
}

/// A checkpoint is written once the log has grown by a segment, and by at least this many times
/// the size of the previous checkpoint.
const CHECKPOINT_SPACING: u64 = 4;

/// Large read buffers, reused: a catch-up page is a read of up to the read budget (4 MiB by
/// default), and a fresh buffer of that size per read costs more than the read itself when
/// the allocator returns it to the kernel in between (each page faulted in and zeroed again).
/// A buffer goes back to the pool when the last `Bytes` sharing it is dropped, after the
/// response has gone out.
mod read_buffers {
    use std::sync::Arc;

    use bytes::Bytes;
    use parking_lot::Mutex;

    /// Reads smaller than this get a buffer of their own.
    const MIN_POOLED: usize = 256 << 10;
    /// Buffers kept while idle.
    const MAX_IDLE: usize = 4;

    #[derive(Default)]
    pub struct Pool {
        idle: Mutex<Vec<Vec<u8>>>,
    }

    /// A buffer that returns to its pool when dropped.
    struct Pooled {
        buf: Vec<u8>,
        pool: Arc<Pool>,
    }

    impl AsRef<[u8]> for Pooled {
        fn as_ref(&self) -> &[u8] {
            &self.buf
        }
    }

    impl Drop for Pooled {
        fn drop(&mut self) {
            let mut idle = self.pool.idle.lock();
            if idle.len() < MAX_IDLE {
                idle.push(std::mem::take(&mut self.buf));
            }
        }
    }

    impl Pool {
        /// A buffer of exactly `len` bytes, to be filled (its old contents are overwritten).
        pub fn take(&self, len: usize) -> Vec<u8> {
            let reused = (len >= MIN_POOLED)
                .then(|| self.idle.lock().pop())
                .flatten();
            let mut buf = reused.unwrap_or_default();
            // Zeroes only what the buffer never held; what it held is overwritten by the read.
            buf.resize(len, 0);
            buf
        }

        /// The filled buffer as `Bytes`; pooled again once every slice of it is dropped.
        pub fn share(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
            if buf.len() < MIN_POOLED {
                return Bytes::from(buf);
            }
            Bytes::from_owner(Pooled {
                buf,
                pool: self.clone(),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_large_buffer_comes_back_once_its_last_slice_is_dropped() {
            let pool = Arc::new(Pool::default());
            let mut buf = pool.take(MIN_POOLED);
            buf[0] = 7;
            let bytes = pool.share(buf);
            let slice = bytes.slice(0..1);
            drop(bytes);
            assert!(pool.idle.lock().is_empty(), "a slice still shares it");
            assert_eq!(&slice[..], &[7]);
            drop(slice);
            assert_eq!(pool.idle.lock().len(), 1);
            // Reused, at the new length (smaller reads truncate, larger ones grow it).
            let again = pool.take(MIN_POOLED + 10);
            assert_eq!(again.len(), MIN_POOLED + 10);
            assert!(pool.idle.lock().is_empty());
            let small = pool.share(pool.take(10));
            assert_eq!(small.len(), 10);
            drop(small);
            assert!(pool.idle.lock().is_empty(), "small reads are not pooled");
        }

        #[test]
        fn at_most_a_few_buffers_stay_idle() {
            let pool = Arc::new(Pool::default());
            let shared: Vec<Bytes> = (0..MAX_IDLE + 3)
                .map(|_| pool.share(pool.take(MIN_POOLED)))
                .collect();
            drop(shared);
            assert_eq!(pool.idle.lock().len(), MAX_IDLE);
        }
    }
}

/// `file-fast`'s background sync. Every interval it syncs what the writer has written (segments
/// rotated away first, then the active segment; a new segment's header and directory entry are
/// synced when it is created) and publishes how far the log is durable; the writer puts that mark in each BATCH frame. After a power loss, recovery
/// then tells damage the OS never wrote back (after every mark that survived: dropped) from
/// damage to synced data (corruption).
mod syncer {
    use std::fs::File;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use parking_lot::{Condvar, Mutex};

    use super::LogPos;

    pub(crate) struct Syncer {
        /// The log's: set when a sync fails, which refuses further writes.
        failed: Arc<AtomicBool>,
        state: Mutex<State>,
        wake: Condvar,
    }

    struct State {
        /// Segments rotated away since the last sync, oldest first.
        older: Vec<Arc<File>>,
        /// The active segment and where its last written batch ends.
        active: Option<(Arc<File>, LogPos)>,
        /// Every byte of the log before this was synced.
        durable: LogPos,
        stop: bool,
    }

    impl Syncer {
        pub fn new(durable: LogPos, failed: Arc<AtomicBool>) -> Syncer {
            Syncer {
                failed,
                state: Mutex::new(State {
                    older: Vec::new(),
                    active: None,
                    durable,
                    stop: false,
                }),
                wake: Condvar::new(),
            }
        }

        pub fn durable(&self) -> LogPos {
            self.state.lock().durable
        }

        /// The writer wrote a batch ending at `end` into `file`.
        pub fn written(&self, file: &Arc<File>, end: LogPos) {
            let mut s = self.state.lock();
            match &mut s.active {
                Some((f, pos)) if Arc::ptr_eq(f, file) => *pos = end,
                active => *active = Some((file.clone(), end)),
            }
        }

        /// The writer moved on to a new segment; `old` still needs its sync.
        pub fn rotated(&self, old: Arc<File>) {
            let mut s = self.state.lock();
            s.active = None;
            s.older.push(old);
        }

        /// Syncs everything written so far now (for a checkpoint) and moves the mark.
        pub fn sync_now(&self) -> Result<(), crate::storage::StorageError> {
            let mut s = self.state.lock();
            let older = std::mem::take(&mut s.older);
            let active = s.active.clone();
            let synced = older
                .iter()
                .chain(active.as_ref().map(|(f, _)| f))
                .try_for_each(|f| f.sync_data());
            match synced {
                Ok(()) => {
                    if let Some((_, pos)) = active {
                        s.durable = s.durable.max(pos);
                    }
                    Ok(())
                }
                Err(source) => {
                    tracing::error!(error = %source, "sync of the log failed; refusing writes until restart");
                    self.failed.store(true, Ordering::Relaxed);
                    Err(crate::storage::StorageError::Io {
                        what: "syncing the log for a checkpoint".into(),
                        source,
                    })
                }
            }
        }

        /// Syncs once more and ends `run`.
        pub fn stop(&self) {
            self.state.lock().stop = true;
            self.wake.notify_one();
        }

        pub fn run(&self, interval: Duration) {
            let mut s = self.state.lock();
            loop {
                if !s.stop {
                    self.wake.wait_for(&mut s, interval);
                }
                let stop = s.stop;
                let older = std::mem::take(&mut s.older);
                let active = s.active.clone();
                let synced = parking_lot::MutexGuard::unlocked(&mut s, || {
                    let syncing = std::time::Instant::now();
                    let synced = older
                        .iter()
                        .chain(active.as_ref().map(|(f, _)| f))
                        .try_for_each(|f| f.sync_data());
                    crate::metrics::storage_sync(syncing.elapsed());
                    synced
                });
                match synced {
                    Ok(()) => {
                        if let Some((_, pos)) = active {
                            s.durable = s.durable.max(pos);
                        }
                    }
                    Err(e) => {
                        // After a failed sync the kernel may have dropped the dirty pages, so a
                        // retry could succeed over lost data: the mark never moves again, and
                        // the log refuses writes until a restart recovers it.
                        tracing::error!(error = %e, "background sync of the log failed; refusing writes until restart");
                        self.failed.store(true, Ordering::Relaxed);
                        return;
                    }
                }
                if stop {
                    break;
                }
            }
        }
    }
}
