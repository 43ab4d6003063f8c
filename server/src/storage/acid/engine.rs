//! The write path of `acid` with the commit log (the default): one engine thread acknowledges,
//! one flusher thread keeps redb up to date.
//!
//! The engine takes every operation that queued up (for any shard), checks each against its
//! stream's state row ([`writer::admit`]), writes the admitted ones as one record of the commit
//! log ([`commit_log`]) and syncs it: one `write` and one `fdatasync` for all shards, the same
//! group commit as `file-durable`. Then it answers the operations, puts their data in their
//! streams' RAM caches (the tail cache, and the *unflushed* run that reads use until redb has the
//! data) and hands them to the flusher.
//!
//! The flusher applies what the engine handed over to each shard in one redb transaction per
//! shard every [`FLUSH_INTERVAL`] (sooner once [`FLUSH_BYTES`] wait), each stream's records in
//! that transaction gathered into rows of many records, committed without a sync (redb keeps it
//! in its write buffer; readers see it), then tells the streams' caches how far redb now
//! reaches. When the engine has filled a log segment it asks for a checkpoint: the flusher makes
//! a durable redb commit in every shard recording the number of the last log record applied,
//! after which the engine deletes the full segments no row references ([`super::segments`]:
//! large records stay in the log and rows point at them; the flusher compacts a segment that is
//! mostly dead). After a crash, redb reopens each shard at its checkpoint and start-up replays
//! the log's later records ([`super::replay_log`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase};

use super::codec::StateRow;
use super::commit_log::{self, MAGIC};
use super::segments::{self, LogSegments};
use super::writer::{self, LogAt, Op, OpResult, Pending, WriterStats};
use super::{AcidStats, DbResult, LogCache, Replayed, STATE, layout};
use crate::storage::{StorageError, StreamId, ZERO_FILL_BELOW};

/// How long the flusher gathers acknowledged operations before applying them to redb (unless
/// [`FLUSH_BYTES`] of record data come first). redb's cost is mostly per transaction and per
/// row inserted, and a transaction writes one row per stream for all of that stream's records
/// it holds, so gathering longer makes the flusher cheaper per append: at 64 writers on 100
/// streams, 100 ms instead of 10 cut its CPU time to about a third (`server/STORAGE.md`). Reads
/// do not wait for it: what redb does not have yet is served from RAM.
pub(super) const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// The flusher applies what it holds as soon as this much record data is waiting: with
/// [`FLUSH_QUEUE`] (what may queue while a flush runs) this bounds the acknowledged data that
/// waits in RAM for redb.
const FLUSH_BYTES: usize = 16 << 20;
/// Zeros are written this far ahead of the records at a time.
const EXTEND_BYTES: u64 = 1 << 20;
/// How often idle threads look for checkpoint work.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Batches the engine may hand the flusher before it waits for it (what is acknowledged and not
/// yet in redb is held in RAM; this bounds it).
const FLUSH_QUEUE: usize = 4096;

/// Settings of the engine.
#[derive(Clone, Copy, Debug)]
pub(super) struct EngineOptions {
    /// A segment is closed, and a checkpoint requested, once it holds this many bytes.
    pub segment_bytes: u64,
    /// Records this long or longer are referenced in the log rather than copied into redb.
    pub ref_min_bytes: usize,
}

/// Checkpoint requests (engine → flusher) and their completion, as record numbers.
#[derive(Debug, Default)]
struct Checkpoints {
    /// The engine wants every shard checkpointed at least up to this record (the last record of
    /// the newest full segment).
    wanted: AtomicU64,
    /// Every shard's durable state holds everything up to this record.
    durable: AtomicU64,
    /// Set by the flusher when redb refused a write: the engine then refuses new operations.
    broken: AtomicBool,
    /// The segments rows reference as of the checkpoint `durable` (set before it): the engine
    /// keeps these.
    live: Mutex<BTreeSet<u64>>,
    /// Held while checkpointing, compacting or deleting segments (so that tests can copy a
    /// store's files as a crash would leave them, none deleted half-way through the copy).
    pub(super) hold: Arc<Mutex<()>>,
}

/// What the engine hands the flusher: the operations of one log record.
struct Work {
    lsn: u64,
    /// The segment the record is in.
    segment: u64,
    ops: Vec<(Op, Option<Arc<LogCache>>, Option<LogAt>)>,
    /// Record data the operations carry.
    bytes: usize,
}

/// Starts the engine and its flusher after start-up `replayed` the log: its last record is
/// applied everywhere, the engine writes the next segment, and the kept ones are referenced.
/// Returns the engine's thread and the lock its background work holds ([`Checkpoints::hold`]).
pub(super) fn start(
    dir: &Path,
    dbs: Vec<Arc<Database>>,
    replayed: Replayed,
    options: EngineOptions,
    log_segments: Arc<LogSegments>,
    stats: Arc<WriterStats>,
    ops: Receiver<Pending>,
) -> Result<(JoinHandle<()>, Arc<Mutex<()>>), StorageError> {
    let (lsn, segment) = (replayed.lsn, replayed.next_segment);
    let file = commit_log::create_segment(dir, segment)?;
    let checkpoints = Arc::new(Checkpoints {
        live: Mutex::new(replayed.kept.iter().copied().collect()),
        ..Checkpoints::default()
    });
    let (work, queue) = std::sync::mpsc::sync_channel(FLUSH_QUEUE);
    let flusher = spawn("ds-acid-flush", {
        let dbs = dbs.clone();
        let checkpoints = checkpoints.clone();
        let flusher = Flusher {
            dir: dir.to_owned(),
            segments: log_segments.clone(),
            ref_min: options.ref_min_bytes,
        };
        move || flusher.run(&dbs, queue, &checkpoints, lsn, segment)
    })?;
    let engine = Engine {
        dir: dir.to_owned(),
        dbs,
        file,
        segment,
        segment_len: MAGIC.len() as u64,
        extended_to: MAGIC.len() as u64,
        lsn,
        unsynced: false,
        options,
        rows: HashMap::new(),
        forgot_upto: lsn,
        checkpoints,
        // Kept segments are checkpointed; they go once nothing references them.
        retiring: replayed.kept.iter().map(|&n| (n, 0)).collect(),
        segments: log_segments,
        failed: None,
        stats,
    };
    let hold = engine.checkpoints.hold.clone();
    Ok((
        spawn("ds-acid-engine", move || engine.run(ops, work, flusher))?,
        hold,
    ))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StorageError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|source| StorageError::Io {
            what: format!("starting thread {name}"),
            source,
        })
}

struct Engine {
    dir: PathBuf,
    dbs: Vec<Arc<Database>>,
    file: File,
    segment: u64,
    segment_len: u64,
    /// How far the segment file reaches (zeros beyond `segment_len`).
    extended_to: u64,
    /// Number of the last record written.
    lsn: u64,
    /// Whether the last record was written without a sync.
    unsynced: bool,
    options: EngineOptions,
    /// The state of every stream written since the last checkpoint, as of everything
    /// acknowledged (loaded from redb on first use; dropped again once a checkpoint holds it).
    rows: HashMap<StreamId, StateRow>,
    /// The checkpoint up to which rows were last dropped (`forget_checkpointed`).
    forgot_upto: u64,
    checkpoints: Arc<Checkpoints>,
    /// Full segments and their last record, deleted once every shard's checkpoint covers it
    /// and no row references them.
    retiring: Vec<(u64, u64)>,
    segments: Arc<LogSegments>,
    /// Set after a failed write or sync of the log, or a failed flush: what is on disk or in
    /// redb is then unknown, so nothing more is acknowledged until a restart replays the log.
    failed: Option<String>,
    stats: Arc<WriterStats>,
}

impl Engine {
    fn run(mut self, ops: Receiver<Pending>, work: SyncSender<Work>, flusher: JoinHandle<()>) {
        let mut batch: Vec<Pending> = Vec::new();
        loop {
            let first = match ops.recv_timeout(IDLE_TICK) {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => {
                    self.retire();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            writer::drain(first, &ops, &mut batch);
            let began = Instant::now();
            let results = self.admit(&batch);
            let admitted = Instant::now();
            let segment = self.segment;
            let (results, firsts) = self.write(&batch, results);
            self.stats
                .apply_micros
                .fetch_add((admitted - began).as_micros() as u64, Ordering::Relaxed);
            self.stats
                .commit_micros
                .fetch_add(admitted.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.stats.transactions.fetch_add(1, Ordering::Relaxed);
            self.stats
                .operations
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            crate::metrics::storage_batch(batch.len());
            let mut flushed = Vec::new();
            let mut bytes = 0;
            // One per operation written, in order.
            let mut firsts = firsts.into_iter();
            for (pending, result) in batch.drain(..).zip(results) {
                let ok = result.is_ok();
                let at = if ok { firsts.next().flatten() } else { None };
                match &result {
                    Ok(()) => pending.committed(),
                    Err(e) => tracing::error!(error = %e, "acid write failed"),
                }
                if let Some(done) = pending.done {
                    // The waiter may have gone (client hung up); the write stands regardless.
                    let _ = done.send(result);
                }
                if ok {
                    bytes += pending.op.data_bytes();
                    flushed.push((pending.op, pending.cache, at));
                }
            }
            if !flushed.is_empty() {
                let mut next = Work {
                    lsn: self.lsn,
                    segment,
                    ops: flushed,
                    bytes,
                };
                // Full means the flusher is behind: wait for it rather than hold more in RAM.
                loop {
                    match work.try_send(next) {
                        Ok(()) => break,
                        Err(TrySendError::Full(back)) => {
                            next = back;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            self.fail("the acid flusher stopped".into());
                            break;
                        }
                    }
                }
            }
            if self.segment_len >= self.options.segment_bytes && self.failed.is_none() {
                self.roll();
            }
            self.retire();
        }
        // Closing the queue makes the flusher apply what is left and checkpoint every shard.
        drop(work);
        if flusher.join().is_err() {
            tracing::error!("acid flusher thread panicked");
        }
    }

    /// Checks each operation against its stream's row, advancing the rows of admitted ones.
    fn admit(&mut self, batch: &[Pending]) -> Vec<OpResult> {
        if self.checkpoints.broken.load(Ordering::Acquire) && self.failed.is_none() {
            self.fail("applying acknowledged writes to redb failed (see the log)".into());
        }
        if let Some(why) = &self.failed {
            return batch.iter().map(|_| Err(refused(why))).collect();
        }
        let dbs = &self.dbs;
        let mut load = |id: StreamId| load_row(dbs, id);
        // The record these operations go into.
        let lsn = self.lsn + 1;
        batch
            .iter()
            .map(|p| {
                let admitted = writer::admit(&mut self.rows, &mut load, &p.op).unwrap_or_else(Err);
                if admitted.is_ok()
                    && let Some(row) = self.rows.get_mut(&p.op.id())
                {
                    row.lsn = lsn;
                }
                admitted
            })
            .collect()
    }

    /// Drops the rows that every shard's checkpoint holds as they are (no change since record
    /// `durable`): redb has them, and [`load_row`] reads one back if its stream is written
    /// again. So the engine keeps the streams written since the last checkpoint, not every
    /// stream written since start-up (a million streams created once held about 150 MB here).
    fn forget_checkpointed(&mut self, durable: u64) {
        if durable <= self.forgot_upto {
            return;
        }
        self.forgot_upto = durable;
        self.rows.retain(|_, row| row.lsn > durable);
        if self.rows.capacity() > 4 * self.rows.len().max(1024) {
            self.rows.shrink_to_fit();
        }
    }

    /// Writes the admitted operations as one record and syncs it (unless only touches, which
    /// nobody waits for, are in it). A failure fails every admitted operation. Returns, for each
    /// operation written, where its first record's bytes are in the log.
    fn write(
        &mut self,
        batch: &[Pending],
        mut results: Vec<OpResult>,
    ) -> (Vec<OpResult>, Vec<Option<LogAt>>) {
        let admitted: Vec<&Op> = batch
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(p, _)| &p.op)
            .collect();
        if admitted.is_empty() {
            return (results, Vec::new());
        }
        let mut firsts = Vec::with_capacity(admitted.len());
        let record = commit_log::frame(self.lsn + 1, &admitted, &mut firsts);
        let (segment, base) = (self.segment, self.segment_len);
        let firsts = firsts
            .into_iter()
            .map(|at| {
                at.map(|at| LogAt {
                    segment,
                    offset: base + at,
                })
            })
            .collect();
        let sync = batch.iter().any(|p| p.done.is_some());
        let written = self
            .extend_for(record.len() as u64)
            .and_then(|()| {
                std::os::unix::fs::FileExt::write_all_at(&self.file, &record, self.segment_len)
            })
            .and_then(|()| {
                if !sync {
                    return Ok(());
                }
                let syncing = Instant::now();
                self.file.sync_data()?;
                crate::metrics::storage_sync(syncing.elapsed());
                Ok(())
            });
        match written {
            Ok(()) => {
                self.lsn += 1;
                self.segment_len += record.len() as u64;
                self.unsynced = !sync;
            }
            Err(e) => {
                let why = format!(
                    "writing {}: {e}",
                    commit_log::segment_path(&self.dir, self.segment).display()
                );
                self.fail(why.clone());
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(StorageError::Io {
                        what: "writing the acid commit log".into(),
                        source: std::io::Error::other(why.clone()),
                    });
                }
            }
        }
        (results, firsts)
    }

    /// Writes zeros ahead of the records so that `len` more bytes land inside the file: a sync
    /// that only overwrites blocks costs about half of one that also grows the file (measured:
    /// 139-161 µs against 250 µs on the test VM). The next sync makes the zeros durable.
    /// A record of [`ZERO_FILL_BELOW`] or more only lengthens the file to hold it.
    fn extend_for(&mut self, len: u64) -> std::io::Result<()> {
        let end = self.segment_len + len;
        if end > self.extended_to && len >= ZERO_FILL_BELOW {
            let grown = end.next_multiple_of(4096);
            self.file.set_len(grown)?;
            self.extended_to = grown;
            return Ok(());
        }
        while end > self.extended_to {
            let zeros = vec![0u8; EXTEND_BYTES as usize];
            std::os::unix::fs::FileExt::write_all_at(&self.file, &zeros, self.extended_to)?;
            self.extended_to += EXTEND_BYTES;
        }
        Ok(())
    }

    fn fail(&mut self, why: String) {
        tracing::error!(error = %why, "acid writes are refused until a restart");
        self.failed = Some(why);
    }

    /// Starts the next segment and asks for a checkpoint. A record nobody waited for (only
    /// touches) is not synced when written; the full segment is synced first in that case, so
    /// that a later segment is never on disk without everything before it (a damaged segment
    /// that is not the last one is refused at start-up as corrupt).
    fn roll(&mut self) {
        if self.unsynced {
            if let Err(e) = self.file.sync_data() {
                self.fail(format!(
                    "syncing {}: {e}",
                    commit_log::segment_path(&self.dir, self.segment).display()
                ));
                return;
            }
            self.unsynced = false;
        }
        match commit_log::create_segment(&self.dir, self.segment + 1) {
            Ok(file) => {
                // The zeros written ahead of the records go: the segment may be kept for a long
                // time (rows reference it), and compaction judges it by its size. Only bytes
                // before the end of the records are ever read or referenced.
                if let Err(e) = self.file.set_len(self.segment_len) {
                    tracing::warn!(error = %e, "could not trim a full acid commit log segment");
                }
                // Its last record is already on its way to the flusher (sent before the roll).
                self.checkpoints
                    .wanted
                    .fetch_max(self.lsn, Ordering::AcqRel);
                self.retiring.push((self.segment, self.lsn));
                self.file = file;
                self.segment += 1;
                self.segment_len = MAGIC.len() as u64;
                self.extended_to = MAGIC.len() as u64;
            }
            // Keep appending to the current segment; the next batch tries again.
            Err(e) => tracing::warn!(error = %e, "could not start a new acid commit log segment"),
        }
    }

    /// Deletes the full segments every shard has checkpointed past that no row references.
    fn retire(&mut self) {
        let durable = self.checkpoints.durable.load(Ordering::Acquire);
        self.forget_checkpointed(durable);
        let before = self.retiring.len();
        let dir = &self.dir;
        // Never wait for the flusher's checkpoint here (appends would wait with it): the next
        // batch or idle tick tries again.
        let Some(_held) = self.checkpoints.hold.try_lock() else {
            return;
        };
        // Set before `durable`: at least as new as the checkpoint read above.
        let live = self.checkpoints.live.lock();
        let segments = &self.segments;
        self.retiring.retain(|&(segment, last)| {
            if last > durable || live.contains(&segment) {
                return true;
            }
            segments.forget(segment);
            let path = commit_log::segment_path(dir, segment);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, file = %path.display(), "could not delete a checkpointed acid commit log segment");
            }
            false
        });
        if self.retiring.len() != before
            && let Err(e) = commit_log::sync_dir(&self.dir)
        {
            tracing::warn!(error = %e, "could not sync the acid directory");
        }
    }
}

fn refused(why: &str) -> StorageError {
    StorageError::Io {
        what: "writing to the acid store".into(),
        source: std::io::Error::other(format!(
            "writes are refused since an earlier one failed ({why}); restart the server"
        )),
    }
}

/// A stream's state row as redb has it (only asked for streams the engine has not seen since
/// start-up, whose rows the last checkpoint holds).
fn load_row(dbs: &[Arc<Database>], id: StreamId) -> Result<Option<StateRow>, StorageError> {
    let db = &dbs[layout::shard_of(id, dbs.len() as u32)];
    let txn = db.begin_read().ctx("reading a state row")?;
    let state = txn.open_table(STATE).ctx("reading a state row")?;
    match state.get(id).ctx("reading a state row")? {
        Some(raw) => Ok(Some(StateRow::decode(id, raw.value())?)),
        None => Ok(None),
    }
}

/// The flusher's settings.
struct Flusher {
    dir: PathBuf,
    segments: Arc<LogSegments>,
    ref_min: usize,
}

/// How soon after rows referencing the log were deleted (released, removed, compacted) the
/// flusher checkpoints so that the segments they pinned can go, if no segment roll does first.
const FREED_CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// Most record bytes one round of compaction copies into rows (all shards and segments
/// together); the rest waits for the next checkpoint's round.
const COMPACT_BYTES: u64 = 64 << 20;

impl Flusher {
    /// Applies acknowledged operations to their shards, checkpoints when asked (and when
    /// deleted rows may have freed segments), compacts mostly dead segments after checkpoints.
    /// `lsn` is the last record applied everywhere, `segment` the one the next is written to.
    fn run(
        &self,
        dbs: &[Arc<Database>],
        queue: Receiver<Work>,
        checkpoints: &Checkpoints,
        mut lsn: u64,
        mut segment: u64,
    ) {
        let shards = dbs.len();
        let mut rows: Vec<HashMap<StreamId, StateRow>> = vec![HashMap::new(); shards];
        let mut unsaved: Vec<HashSet<StreamId>> = vec![HashSet::new(); shards];
        let stats = WriterStats::default();
        let mut open = true;
        let mut freed_at_checkpoint = 0;
        let mut last_checkpoint = Instant::now();
        while open {
            let mut works = Vec::new();
            match queue.recv_timeout(IDLE_TICK) {
                Ok(first) => works.push(first),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
            if let Some(first) = works.first() {
                // Gather more, so that each shard's transaction carries many records per stream.
                let deadline = Instant::now() + FLUSH_INTERVAL;
                let mut bytes = first.bytes;
                while bytes < FLUSH_BYTES {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match queue.recv_timeout(left) {
                        Ok(work) => {
                            bytes += work.bytes;
                            works.push(work);
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            }
            if !checkpoints.broken.load(Ordering::Acquire) && !works.is_empty() {
                match flush(dbs, &mut rows, &mut unsaved, &stats, works, self.ref_min) {
                    Ok(Some(last)) => (lsn, segment) = last,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "acid flush to redb failed; writes are refused until a restart, which replays the commit log");
                        checkpoints.broken.store(true, Ordering::Release);
                    }
                }
            }
            // Checkpoint once the records the engine wants covered have all been applied (the
            // last of them may still be queued here), and at shutdown; and a while after rows
            // referencing the log were deleted, so that the segments they kept can go.
            let wanted = checkpoints.wanted.load(Ordering::Acquire);
            let asked = wanted > checkpoints.durable.load(Ordering::Acquire) && lsn >= wanted;
            let freed = stats.freed_ref_bytes.load(Ordering::Relaxed);
            let freeing =
                freed != freed_at_checkpoint && last_checkpoint.elapsed() >= FREED_CHECKPOINT_AFTER;
            if (asked || freeing || !open) && !checkpoints.broken.load(Ordering::Acquire) {
                let held = checkpoints.hold.lock();
                let mut ok = true;
                for (i, db) in dbs.iter().enumerate() {
                    if let Err(e) = writer::checkpoint(db, &rows[i], &mut unsaved[i], lsn, segment)
                    {
                        tracing::warn!(shard = i, error = %e, "acid checkpoint failed; retrying");
                        ok = false;
                        break;
                    }
                }
                if ok {
                    freed_at_checkpoint = freed;
                    last_checkpoint = Instant::now();
                    // What rows reference as of this durable checkpoint: before `durable`, so
                    // the engine never pairs a newer checkpoint with an older set.
                    let live = segments::live_all(dbs);
                    match &live {
                        Ok(live) => {
                            *checkpoints.live.lock() = live.keys().copied().collect();
                            checkpoints.durable.store(lsn, Ordering::Release);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading segment_live failed; commit log segments are kept until the next checkpoint");
                        }
                    }
                    drop(held);
                    if let (Ok(live), true) = (&live, open) {
                        self.compact(dbs, live, segment, &stats);
                    }
                    // Every row is in redb now: a stream written again has its row read back
                    // from its shard's `state` table (in the flush's transaction). Keeping them
                    // all made this map, beside the engine's, hold every stream written since
                    // start-up.
                    for (rows, unsaved) in rows.iter_mut().zip(unsaved.iter_mut()) {
                        *rows = HashMap::new();
                        *unsaved = HashSet::new();
                    }
                }
            }
        }
        let mut totals = AcidStats::default();
        totals.add(&stats);
        totals.log("acid flusher stopped");
    }

    /// Compacts the closed segments that rows reference for less than half their size, oldest
    /// first, copying up to [`COMPACT_BYTES`] of records into rows per round (the flusher's
    /// other work waits meanwhile), so that the next checkpoint lets them go. A failure is
    /// logged and the segment kept.
    fn compact(
        &self,
        dbs: &[Arc<Database>],
        live: &std::collections::BTreeMap<u64, u64>,
        closed_below: u64,
        stats: &WriterStats,
    ) {
        let mut budget = COMPACT_BYTES;
        for segment in segments::worth_compacting(&self.dir, live, closed_below) {
            for (i, db) in dbs.iter().enumerate() {
                if budget == 0 {
                    return;
                }
                match segments::compact(db, &self.segments, segment, budget) {
                    Ok(0) => {}
                    Ok(moved) => {
                        budget = budget.saturating_sub(moved);
                        stats.freed_ref_bytes.fetch_add(moved, Ordering::Relaxed);
                        tracing::debug!(
                            shard = i,
                            segment,
                            moved,
                            "acid commit log segment compacted"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(shard = i, segment, error = %e, "compacting an acid commit log segment failed; it is kept");
                    }
                }
            }
        }
    }
}

/// Applies `works` shard by shard, one transaction each, then moves the streams' flushed marks.
/// Returns the number of the last record applied.
fn flush(
    dbs: &[Arc<Database>],
    rows: &mut [HashMap<StreamId, StateRow>],
    unsaved: &mut [HashSet<StreamId>],
    stats: &WriterStats,
    works: Vec<Work>,
    ref_min: usize,
) -> Result<Option<(u64, u64)>, StorageError> {
    let shards = dbs.len();
    let last = works.last().map(|w| (w.lsn, w.segment));
    let mut per_shard: Vec<Vec<Pending>> = (0..shards).map(|_| Vec::new()).collect();
    for work in works {
        for (op, cache, at) in work.ops {
            let shard = layout::shard_of(op.id(), shards as u32);
            per_shard[shard].push(Pending {
                op,
                cache,
                done: None,
                at,
            });
        }
    }
    for (shard, batch) in per_shard.iter().enumerate() {
        if batch.is_empty() {
            continue;
        }
        let results = writer::commit(
            &dbs[shard],
            &mut rows[shard],
            batch,
            stats,
            Some(&mut unsaved[shard]),
            ref_min,
        )?;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(StorageError::Corrupt {
                what: format!("applying acknowledged writes to shard {shard}"),
                detail: e.to_string(),
            });
        }
        for pending in batch {
            if let (Some(cache), Some(end)) = (&pending.cache, pending.op.end()) {
                cache.flushed(end);
            }
        }
    }
    Ok(last)
}
