//! `acid`: streams live in redb databases, one per shard; acknowledged means synced in the commit
//! log ([`engine`], the default) or committed in a redb transaction with immediate durability.
//!
//! Layout: `acid-layout.json` records the shard count and the stream-to-shard hash (see
//! [`layout`]); `shard-NNN.redb` are the shards. A stream lives wholly in one shard, chosen by a
//! stable hash of its id. The tables and value encodings are described in `server/STORAGE.md`
//! (section "acid mode").
//!
//! Writes: each shard has one writer thread ([`writer`]) that batches every operation queued
//! while its previous commit was syncing into the next transaction (group commit). An append's
//! record, its producer state, the stream's `Stream-Seq` and closed flag land in the same
//! transaction, so after a crash either all of it is there or none of it. One channel per shard
//! keeps the operations of a stream in submission order.
//!
//! Reads of a stream's newest records (live readers at the tail) are served from a RAM cache
//! that the writer fills once a commit succeeds ([`TailCache`], shared with the file backend).
//! Other reads run in `spawn_blocking` on a redb read transaction (readers never wait for the
//! writer), range-scan from the record holding the read's start and stop at the byte budget;
//! they never load a whole stream.
//!
//! This module must not make protocol decisions: it persists what the stream layer decided.

mod codec;
mod commit_log;
mod engine;
mod gate;
mod layout;
mod segments;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::tail_cache::{CacheBudget, TailCache, read_run};
use super::{
    AppendEntry, Commit, ProducerState, ProducerTuple, ReadChunk, Recovered, Storage, StorageError,
    StreamId, StreamLog, StreamMeta, WriterSnapshot, plan_read,
};
pub use writer::REF_MIN_BYTES;
use writer::{Op, Pending, WriterStats};

/// Stream id → the stream's configuration (JSON + CRC-32C), written once at creation.
const STREAMS: TableDefinition<u64, &[u8]> = TableDefinition::new("streams");
/// Stream id → the small writer-state row ([`codec::StateRow`]), rewritten once per transaction
/// that changes the stream.
const STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("state");
/// (stream id, producer id) → (epoch, last seq); only the producer an append names is written.
const PRODUCERS: TableDefinition<(u64, &str), (u64, u64)> = TableDefinition::new("producers");
/// (stream id, producer id) → when the producer's last append was accepted (Unix ms), for
/// `DS_LIMITS__PRODUCER_IDLE_TIMEOUT`. A table of its own so that directories written before it
/// existed open unchanged: a producer without a row here has an unknown time (0).
const PRODUCER_USED: TableDefinition<(u64, &str), u64> = TableDefinition::new("producer_used");
/// (stream id, start position) → record data + CRC-32C, or references into the commit log.
const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");
/// (commit log segment, stream id, row start) → (): the reference rows into each segment.
const SEGMENT_ROWS: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("segment_rows");
/// Commit log segment → bytes the shard's rows reference in it (no entry: none).
const SEGMENT_LIVE: TableDefinition<u64, u64> = TableDefinition::new("segment_live");

/// The commit log's checkpoint mark: [`LAST_RECORD`] → the number of the last commit log record
/// this shard's durable state holds (records up to it are not replayed).
const CHECKPOINT: TableDefinition<&str, u64> = TableDefinition::new("checkpoint");
const LAST_RECORD: &str = "last_record";
/// [`CHECKPOINT`] key: the commit log segment replay starts from (the one holding the record
/// after [`LAST_RECORD`], or an earlier one). Absent in directories of layout version 3: 0.
const REPLAY_FROM: &str = "replay_from";

/// One item of a range over the `records` table.
type RowItem<'a> = Result<
    (
        redb::AccessGuard<'a, (u64, u64)>,
        redb::AccessGuard<'a, &'static [u8]>,
    ),
    redb::StorageError,
>;

/// Page cache redb may use across all shards together (split evenly).
const CACHE_BYTES_TOTAL: usize = 256 << 20;
/// A sliding-TTL stream's access time is persisted at most this often; TTLs count in seconds
/// and the value is a best-effort hint (losing the last second on a crash is harmless).
const TOUCH_PERSIST_INTERVAL_MS: u64 = 1000;

/// Adds what was being done to a redb error.
trait DbResult<T> {
    fn ctx(self, what: &str) -> Result<T, StorageError>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, StorageError> {
        self.map_err(|e| match e.into() {
            redb::Error::Io(source) => StorageError::Io {
                what: what.to_owned(),
                source,
            },
            other => StorageError::Corrupt {
                what: what.to_owned(),
                detail: other.to_string(),
            },
        })
    }
}

/// Settings of the acid backend.
#[derive(Clone, Copy, Debug)]
pub struct AcidOptions {
    /// Number of shards (a power of two from 1 to 256), fixed when the directory is created.
    pub shard_count: u32,
    /// RAM for the newest records of all streams together.
    pub cache_bytes: usize,
    /// Acknowledge through the commit log (one sync for all shards, redb made durable at
    /// checkpoints) rather than a synced redb commit per shard and batch.
    pub commit_log: bool,
    /// With the commit log: a segment is closed and every shard checkpointed once it holds
    /// this many bytes.
    pub log_segment_bytes: u64,
    /// With the commit log: records this long or longer stay in its segments and their rows
    /// reference them (`usize::MAX`: every record is copied into redb).
    pub ref_min_bytes: usize,
    /// Reads of referenced records map the segments' pages rather than copy them.
    pub map_reads: bool,
    /// Most commit log segments open for reads at a time.
    pub max_open_files: usize,
}

impl AcidOptions {
    /// `shard_count` shards and `cache_bytes` of tail cache, with the defaults otherwise (the
    /// commit log on, 64 MiB segments).
    pub fn new(shard_count: u32, cache_bytes: usize) -> AcidOptions {
        AcidOptions {
            shard_count,
            cache_bytes,
            commit_log: true,
            log_segment_bytes: 64 << 20,
            ref_min_bytes: writer::REF_MIN_BYTES,
            map_reads: true,
            max_open_files: 64,
        }
    }
}

/// The redb-backed, sharded backend.
pub struct AcidStorage {
    dir: PathBuf,
    shards: Vec<Arc<Shard>>,
    /// Shared by the tail caches of all streams.
    cache: Arc<CacheBudget>,
    /// Held by the commit log's background work (checkpoints, compaction, deleting segments);
    /// tests hold it to copy a running store's files as a crash would leave them.
    #[cfg_attr(not(test), allow(dead_code))]
    background: Option<Arc<Mutex<()>>>,
    /// Whether writes go through the commit log (and the engine's counters, if so).
    engine_stats: Option<Arc<WriterStats>>,
    /// Subscription state (see `storage::records`), synced before it is acknowledged.
    records: super::records::RecordLog,
    /// Shards redb had to rebuild when this store opened (see [`AcidStorage::repaired_shards`]).
    repaired_shards: usize,
}

impl std::fmt::Debug for AcidStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcidStorage")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// Totals over all shards since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcidStats {
    /// Write transactions committed.
    pub transactions: u64,
    /// Operations (creates, appends, deletes, touches) they carried.
    pub operations: u64,
    /// Writer time spent applying operations to transactions, in microseconds.
    pub apply_micros: u64,
    /// Writer time spent committing (writing pages and syncing), in microseconds.
    pub commit_micros: u64,
}

impl AcidStats {
    /// Adds `stats`' counters to these totals.
    fn add(&mut self, stats: &WriterStats) {
        self.transactions += stats.transactions.load(Ordering::Relaxed);
        self.operations += stats.operations.load(Ordering::Relaxed);
        self.apply_micros += stats.apply_micros.load(Ordering::Relaxed);
        self.commit_micros += stats.commit_micros.load(Ordering::Relaxed);
    }

    /// Logs the totals, per transaction, at info level with `message`.
    fn log(&self, message: &str) {
        let per_txn = |micros: u64| micros / self.transactions.max(1);
        tracing::info!(
            transactions = self.transactions,
            operations = self.operations,
            ops_per_transaction = format!(
                "{:.1}",
                self.operations as f64 / self.transactions.max(1) as f64
            ),
            apply_us_per_transaction = per_txn(self.apply_micros),
            commit_us_per_transaction = per_txn(self.commit_micros),
            "{message}"
        );
    }
}

/// One shard: its database and the queue of its writer thread.
struct Shard {
    index: usize,
    /// Shared with the writer thread and with in-flight reads.
    db: Arc<Database>,
    /// `None` only while dropping, so the writer sees the queue close.
    ops: Option<mpsc::Sender<Pending>>,
    /// Joined on drop, so the database file is closed once the store and its logs are gone
    /// (a restart in the same process can then open it again).
    writer: Option<JoinHandle<()>>,
    stats: Arc<WriterStats>,
    /// Shared by all shards' writers; counts what is submitted here.
    gate: Option<Arc<gate::CommitGate>>,
    /// The commit log's segments, for reads of referenced records.
    segments: Arc<segments::LogSegments>,
    /// The commit log thread, joined once the last shard (so the last writer) is gone.
    _log: Option<Arc<LogThreadHandle>>,
}

/// Joins the commit log thread when dropped.
struct LogThreadHandle(Option<JoinHandle<()>>);

impl Drop for LogThreadHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take()
            && thread.join().is_err()
        {
            tracing::error!("acid commit log thread panicked");
        }
    }
}

/// Opens (creating if needed) shard `index`'s database with its tables; the flag says whether
/// redb had to rebuild it (an unclean shutdown whose last durable commit saved no allocator
/// state: every page is read).
///
/// A new shard is made under a temporary name (`shard-NNN.redb.tmp`), its tables committed (a
/// durable redb commit: the header and the tables are synced), then renamed into place and the
/// directory synced. redb sizes a new file before its header is written and synced, so a crash
/// while creating it under its real name would leave a file every later start refuses ("Not a
/// redb database"); a crash now leaves at most the temporary file, which the next start deletes.
fn open_db(dir: &Path, index: usize, cache_bytes: usize) -> Result<(Database, bool), StorageError> {
    let path = layout::shard_file(dir, index);
    let what = format!("opening {}", path.display());
    let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let builder = || {
        let mut b = Database::builder();
        b.set_cache_size(cache_bytes);
        let flag = repaired.clone();
        let file = path.clone();
        b.set_repair_callback(move |_| {
            if !flag.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    shard = index,
                    "{} was not shut down cleanly and its last durable commit saved no \
                     allocator state: redb repairs it, reading the whole file",
                    file.display()
                );
            }
        });
        b
    };
    let create_tables = |db: &Database| -> Result<(), StorageError> {
        // Create the tables up front so that readers can always open them.
        let mut txn = db.begin_write().ctx(&what)?;
        // Like a checkpoint, this durable commit saves the allocator state (see
        // `writer::checkpoint`), so that a crash before the first checkpoint repairs quickly.
        txn.set_quick_repair(true);
        txn.open_table(STREAMS).ctx(&what)?;
        txn.open_table(STATE).ctx(&what)?;
        txn.open_table(PRODUCERS).ctx(&what)?;
        txn.open_table(PRODUCER_USED).ctx(&what)?;
        txn.open_table(RECORDS).ctx(&what)?;
        txn.open_table(SEGMENT_ROWS).ctx(&what)?;
        txn.open_table(SEGMENT_LIVE).ctx(&what)?;
        txn.open_table(CHECKPOINT).ctx(&what)?;
        txn.commit().ctx(&what)
    };
    if path.exists() {
        let db = builder().open(&path).ctx(&what)?;
        create_tables(&db)?;
        return Ok((db, repaired.load(Ordering::Relaxed)));
    }
    let tmp = crate::storage::fsutil::temp_path(&path);
    crate::storage::fsutil::remove_leftover(&tmp)?;
    let db = builder().create(&tmp).ctx(&what)?;
    crate::storage::fsutil::crash_point("acid-shard-created");
    create_tables(&db)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|source| StorageError::Io {
            what: format!("syncing {}", tmp.display()),
            source,
        })?;
    // redb holds the file open, not the name: renaming it under the open database is safe.
    std::fs::rename(&tmp, &path).map_err(|source| StorageError::Io {
        what: format!("renaming {} to {}", tmp.display(), path.display()),
        source,
    })?;
    crate::storage::fsutil::crash_point("acid-shard-renamed");
    crate::storage::fsutil::sync_dir(dir)?;
    Ok((db, false))
}

/// The number of the last commit log record that shard `db` holds durably, and the segment
/// replay starts from.
fn last_record(db: &Database) -> Result<(u64, u64), StorageError> {
    let txn = db.begin_read().ctx("reading the checkpoint")?;
    let table = txn.open_table(CHECKPOINT).ctx("reading the checkpoint")?;
    let get = |key: &str| -> Result<u64, StorageError> {
        Ok(table
            .get(key)
            .ctx("reading the checkpoint")?
            .map_or(0, |v| v.value()))
    };
    Ok((get(LAST_RECORD)?, get(REPLAY_FROM)?))
}

/// Most operations one replay transaction takes.
const REPLAY_BATCH: usize = 4096;

/// What start-up found in the commit log.
struct Replayed {
    /// The number of the last record applied (the next one written takes the one after).
    lsn: u64,
    /// The number the next segment takes.
    next_segment: u64,
    /// The segments kept because rows reference them.
    kept: Vec<u64>,
}

/// Applies the commit log's records newer than each shard's checkpoint, checkpoints every
/// shard, and deletes the segments no row references.
fn replay_log(dir: &Path, dbs: &[Arc<Database>], ref_min: usize) -> Result<Replayed, StorageError> {
    let checkpoints = dbs
        .iter()
        .map(|db| last_record(db))
        .collect::<Result<Vec<(u64, u64)>, _>>()?;
    let marks: Vec<u64> = checkpoints.iter().map(|c| c.0).collect();
    let replay_from = checkpoints.iter().map(|c| c.1).min().unwrap_or(0);
    let shards = dbs.len();
    let mut rows: Vec<HashMap<StreamId, codec::StateRow>> = vec![HashMap::new(); shards];
    let mut unsaved: Vec<HashSet<StreamId>> = vec![HashSet::new(); shards];
    let mut pending: Vec<Vec<(writer::Op, Option<writer::LogAt>)>> =
        (0..shards).map(|_| Vec::new()).collect();
    let mut last = marks.iter().copied().max().unwrap_or(0);
    let mut previous: Option<u64> = None;
    let mut replayed = 0u64;
    let apply = |shard: usize,
                 ops: &mut Vec<(writer::Op, Option<writer::LogAt>)>,
                 rows: &mut Vec<HashMap<StreamId, codec::StateRow>>,
                 unsaved: &mut Vec<HashSet<StreamId>>|
     -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        writer::replay(
            &dbs[shard],
            &mut rows[shard],
            &mut unsaved[shard],
            std::mem::take(ops),
            ref_min,
        )
    };
    let last_segment = commit_log::read_all(dir, replay_from, |record| {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: format!("{} at byte {}", record.file.display(), record.pos),
            detail,
        };
        if let Some(prev) = previous
            && record.lsn != prev + 1
        {
            return Err(corrupt(format!(
                "record {} follows record {prev}: the log has a gap",
                record.lsn
            )));
        }
        previous = Some(record.lsn);
        last = last.max(record.lsn);
        for (op, at) in record.ops.into_iter().zip(record.firsts) {
            let shard = layout::shard_of(op.id(), shards as u32);
            if record.lsn <= marks[shard] {
                continue;
            }
            pending[shard].push((op, at));
            if pending[shard].len() >= REPLAY_BATCH {
                apply(shard, &mut pending[shard], &mut rows, &mut unsaved)
                    .map_err(|e| corrupt(format!("replaying record {}: {e}", record.lsn)))?;
            }
        }
        replayed += 1;
        Ok(())
    })?;
    for (shard, ops) in pending.iter_mut().enumerate() {
        apply(shard, ops, &mut rows, &mut unsaved).map_err(|e| StorageError::Corrupt {
            what: format!(
                "replaying the commit log in {} into shard {shard}",
                dir.display()
            ),
            detail: e.to_string(),
        })?;
    }
    let next_segment = last_segment.map_or(replay_from, |n| n + 1);
    for (i, db) in dbs.iter().enumerate() {
        writer::checkpoint(db, &rows[i], &mut unsaved[i], last, next_segment)?;
    }
    // Every shard's checkpoint is durable: a segment no row references now is never needed.
    let live = segments::live_all(dbs)?;
    let segments = commit_log::segments(dir)?;
    let mut kept = Vec::new();
    let mut deleted = 0;
    for (n, path) in &segments {
        if live.contains_key(n) {
            kept.push(*n);
            continue;
        }
        std::fs::remove_file(path).map_err(|source| StorageError::Io {
            what: format!("deleting {}", path.display()),
            source,
        })?;
        deleted += 1;
    }
    if let Some(missing) = live.keys().find(|n| !kept.contains(n)) {
        return Err(StorageError::Corrupt {
            what: format!("{}", commit_log::segment_path(dir, *missing).display()),
            detail: "records rows reference this commit log segment, which is missing".into(),
        });
    }
    if deleted > 0 {
        commit_log::sync_dir(dir)?;
    }
    if replayed > 0 {
        tracing::info!(
            records = replayed,
            deleted,
            kept = kept.len(),
            "acid commit log replayed"
        );
    }
    Ok(Replayed {
        lsn: last,
        next_segment,
        kept,
    })
}

impl Shard {
    /// Shard `index` over `db` with a writer thread of its own (per-shard syncs).
    fn with_writer(
        index: usize,
        db: Arc<Database>,
        gate: Option<Arc<gate::CommitGate>>,
        segments: Arc<segments::LogSegments>,
    ) -> Result<Shard, StorageError> {
        let (ops, queue) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let writer = std::thread::Builder::new()
            .name(format!("ds-acid-{index}"))
            .spawn({
                let db = db.clone();
                let stats = stats.clone();
                let gate = gate.clone();
                move || writer::run(db, queue, stats, gate)
            })
            .map_err(|source| StorageError::Io {
                what: format!("starting the writer of shard {index}"),
                source,
            })?;
        Ok(Shard {
            index,
            db,
            ops: Some(ops),
            writer: Some(writer),
            stats,
            gate,
            segments,
            _log: None,
        })
    }

    /// Shard `index` over `db`, written through the commit log's engine.
    fn logged(
        index: usize,
        db: Arc<Database>,
        ops: mpsc::Sender<Pending>,
        engine: Arc<LogThreadHandle>,
        segments: Arc<segments::LogSegments>,
    ) -> Shard {
        Shard {
            index,
            db,
            ops: Some(ops),
            writer: None,
            stats: Arc::new(WriterStats::default()),
            gate: None,
            segments,
            _log: Some(engine),
        }
    }

    /// Queues `op` and returns the future of its commit. The write happens whether or not the
    /// future is polled or dropped.
    fn submit(&self, op: Op, cache: Option<Arc<LogCache>>) -> Commit {
        let (done, answer) = oneshot::channel();
        if !self.send(Pending {
            op,
            cache,
            done: Some(done),
            at: None,
        }) {
            return Box::pin(std::future::ready(Err(StorageError::ShuttingDown)));
        }
        Box::pin(async move { answer.await.unwrap_or(Err(StorageError::ShuttingDown)) })
    }

    fn send(&self, pending: Pending) -> bool {
        // Counted before the writer can see it, so that the count never goes below zero.
        if let Some(gate) = &self.gate {
            gate.submitted(1);
        }
        let sent = self
            .ops
            .as_ref()
            .is_some_and(|ops| ops.send(pending).is_ok());
        if !sent && let Some(gate) = &self.gate {
            gate.finished(1);
        }
        sent
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what is queued. Joining waits
        // for at most that one commit; it happens when the last log of the shard goes, which is
        // at shutdown.
        self.ops.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(shard = self.index, "acid writer thread panicked");
        }
    }
}

impl Drop for AcidStorage {
    fn drop(&mut self) {
        self.stats().log("acid store closed");
    }
}

impl AcidStorage {
    /// Opens (creating if needed) the store under `dir`.
    ///
    /// Refuses a shard count that is not a power of two from 1 to 256, and one that differs from
    /// the count `dir` was created with.
    pub fn open(dir: &Path, options: AcidOptions) -> Result<AcidStorage, StorageError> {
        let shard_count = options.shard_count;
        layout::check_shard_count(shard_count)?;
        layout::check_or_create(dir, shard_count)?;
        let cache_bytes = (CACHE_BYTES_TOTAL / shard_count as usize).max(4 << 20);
        // Opening a shard after a crash makes redb repair it, which reads the whole file: do the
        // shards side by side.
        let opened: Vec<Result<(Database, bool), StorageError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..shard_count as usize)
                .map(|index| scope.spawn(move || open_db(dir, index, cache_bytes)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StorageError::Corrupt {
                            what: "opening a shard".into(),
                            detail: "the opening thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let opened = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
        let repaired_shards = opened.iter().filter(|(_, repaired)| *repaired).count();
        let dbs: Vec<Arc<Database>> = opened.into_iter().map(|(db, _)| Arc::new(db)).collect();
        // Whatever mode the store ran in last time, what its log holds goes in first.
        let ref_min = if options.commit_log {
            options.ref_min_bytes
        } else {
            usize::MAX
        };
        let replayed = replay_log(dir, &dbs, ref_min)?;
        let log_segments = Arc::new(segments::LogSegments::new(
            dir,
            options.map_reads,
            options.max_open_files,
            options.log_segment_bytes,
        ));
        let mut shards = Vec::with_capacity(dbs.len());
        let mut engine_stats = None;
        let mut background = None;
        if options.commit_log {
            let stats = Arc::new(WriterStats::default());
            let (ops, queue) = mpsc::channel();
            let (engine, hold) = engine::start(
                dir,
                dbs.clone(),
                replayed,
                engine::EngineOptions {
                    segment_bytes: options.log_segment_bytes,
                    ref_min_bytes: ref_min,
                },
                log_segments.clone(),
                stats.clone(),
                queue,
            )?;
            let engine = Arc::new(LogThreadHandle(Some(engine)));
            background = Some(hold);
            for (index, db) in dbs.into_iter().enumerate() {
                shards.push(Arc::new(Shard::logged(
                    index,
                    db,
                    ops.clone(),
                    engine.clone(),
                    log_segments.clone(),
                )));
            }
            engine_stats = Some(stats);
        } else {
            let gate = gate::CommitGate::for_machine(shard_count as usize);
            for (index, db) in dbs.into_iter().enumerate() {
                shards.push(Arc::new(Shard::with_writer(
                    index,
                    db,
                    gate.clone(),
                    log_segments.clone(),
                )?));
            }
        }
        // New shard files must survive a crash before anything in them is acknowledged.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StorageError::Io {
                what: format!("syncing directory {}", dir.display()),
                source,
            })?;
        let records =
            super::records::RecordLog::open(dir, true, std::time::Duration::from_secs(1))?;
        Ok(AcidStorage {
            records,
            repaired_shards,
            dir: dir.to_owned(),
            shards,
            cache: Arc::new(CacheBudget::new(options.cache_bytes)),
            engine_stats,
            background,
        })
    }

    /// Pauses the commit log's checkpoints, compaction and segment deletion while the guard
    /// lives (tests copy a running store's files under it).
    #[cfg(test)]
    fn hold_background(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        self.background.as_ref().map(|h| h.lock())
    }

    /// How many shards redb repaired the slow way when this store opened: after an unclean
    /// shutdown, a shard whose last durable commit saved redb's allocator state (every
    /// checkpoint does) opens without it; others are read whole to rebuild that state.
    pub fn repaired_shards(&self) -> usize {
        self.repaired_shards
    }

    /// Transactions and operations committed since the store was opened.
    pub fn stats(&self) -> AcidStats {
        let mut total = AcidStats::default();
        for shard in &self.shards {
            total.add(&shard.stats);
        }
        if let Some(engine) = &self.engine_stats {
            total.add(engine);
        }
        total
    }

    fn shard_of(&self, id: StreamId) -> &Arc<Shard> {
        &self.shards[layout::shard_of(id, self.shards.len() as u32)]
    }

    /// A log handle for `meta`'s stream, whose records redb holds below `flushed` (with the
    /// commit log; without it, everything acknowledged is in redb).
    /// `released` is the retained start (the log start, or more).
    fn log_for(&self, meta: &StreamMeta, flushed: u64, released: u64) -> AcidLog {
        let flushed = if self.engine_stats.is_some() {
            flushed
        } else {
            u64::MAX
        };
        let log_start = meta.fork().map_or(0, |f| f.offset);
        AcidLog {
            id: meta.id,
            log_start,
            persists_touches: meta.ttl_secs.is_some(),
            touch_sent_ms: AtomicU64::new(0),
            shard: self.shard_of(meta.id).clone(),
            // 0 while nothing past the log start is released: reads before a fork's anchor
            // are misaligned, not released.
            cache: Arc::new(LogCache::new(
                self.cache.clone(),
                flushed,
                if released > log_start { released } else { 0 },
            )),
        }
    }

    fn recover_shard(&self, shard: &Arc<Shard>) -> Result<Vec<Recovered>, StorageError> {
        let what = format!("recovering shard {}", shard.index);
        let txn = shard.db.begin_read().ctx(&what)?;
        let streams = txn.open_table(STREAMS).ctx(&what)?;
        let state = txn.open_table(STATE).ctx(&what)?;
        let producers = txn.open_table(PRODUCERS).ctx(&what)?;
        let producer_used = txn.open_table(PRODUCER_USED).ctx(&what)?;
        let records = txn.open_table(RECORDS).ctx(&what)?;
        let mut found = Vec::new();
        for item in streams.iter().ctx(&what)? {
            let (key, value) = item.ctx(&what)?;
            let id = key.value();
            let meta = codec::decode_meta(id, value.value())?;
            let corrupt = |detail: String| StorageError::Corrupt {
                what: format!("stream {id} in shard {}", shard.index),
                detail,
            };
            if layout::shard_of(id, self.shards.len() as u32) != shard.index {
                return Err(corrupt("stored in the wrong shard".into()));
            }
            let row = match state.get(id).ctx(&what)? {
                Some(raw) => codec::StateRow::decode(id, raw.value())?,
                None => return Err(corrupt("metadata without a state row".into())),
            };
            let log = self.log_for(&meta, row.tail, row.released);
            let released = row.released.max(log.log_start);
            // The last row must end exactly at the tail the same transactions wrote, and the
            // first must hold the retained start (rows wholly before it are deleted).
            let span = |item: Option<RowItem<'_>>| -> Result<Option<(u64, u64)>, StorageError> {
                let Some(item) = item else { return Ok(None) };
                let (k, v) = item.ctx(&what)?;
                let start = k.value().1;
                Ok(Some((
                    start,
                    start + codec::parse_row(id, start, v.value())?.data_len(),
                )))
            };
            let mut rows = records.range((id, 0)..=(id, u64::MAX)).ctx(&what)?;
            let first = span(rows.next())?;
            let last = span(rows.next_back())?.or(first);
            let holds = match (first, last) {
                (Some((start, first_end)), Some((_, end))) => {
                    start <= released && released < first_end && end == row.tail
                }
                _ => released == row.tail,
            };
            let own_bytes = row.own_bytes();
            if !holds || row.tail - released != own_bytes {
                return Err(corrupt(format!(
                    "records {first:?} .. {last:?}, state says [{released}, {}) with {own_bytes} own bytes",
                    row.tail
                )));
            }
            let mut snapshot = WriterSnapshot {
                tail: row.tail,
                closed: row.closed,
                closed_by: row.closed_by.map(|b| *b),
                last_seq: row.last_seq.map(String::from),
                producers: Default::default(),
                soft_deleted: row.soft_deleted,
                last_access_ms: row.last_access_ms,
                own_bytes,
                released,
            };
            for item in producers.range((id, "")..).ctx(&what)? {
                let (k, v) = item.ctx(&what)?;
                let (stream, producer) = k.value();
                if stream != id {
                    break;
                }
                let (epoch, last_seq) = v.value();
                let last_ms = producer_used
                    .get((id, producer))
                    .ctx(&what)?
                    .map_or(0, |v| v.value());
                snapshot.producers.insert(
                    producer.to_owned(),
                    ProducerState {
                        epoch,
                        last_seq,
                        last_ms,
                    },
                );
            }
            log.touch_sent_ms
                .store(row.last_access_ms, Ordering::Relaxed);
            found.push(Recovered {
                meta: Arc::new(meta),
                state: snapshot,
                log: Arc::new(log),
            });
        }
        Ok(found)
    }
}

impl Storage for AcidStorage {
    fn name(&self) -> &'static str {
        "acid"
    }

    fn memory_budget(&self) -> Option<(u64, u64)> {
        Some(self.cache.usage())
    }

    fn keeps_records(&self) -> bool {
        true
    }

    fn write_records(&self, batch: Vec<super::RecordWrite>) -> Commit {
        self.records.write(batch)
    }

    fn recover_records(&self) -> Result<Vec<super::Record>, StorageError> {
        Ok(self.records.take_recovered())
    }

    fn create(
        &self,
        meta: &Arc<StreamMeta>,
        initial: Vec<Bytes>,
        close: Option<Option<ProducerTuple>>,
    ) -> Result<(Arc<dyn StreamLog>, Commit), StorageError> {
        let start = meta.fork().map_or(0, |f| f.offset);
        let log = self.log_for(meta, start, start);
        log.touch_sent_ms
            .store(meta.created_at_ms, Ordering::Relaxed);
        let commit = log.shard.submit(
            Op::Create {
                id: meta.id,
                meta: codec::encode_meta(meta),
                start: log.log_start,
                initial,
                close,
                created_at_ms: meta.created_at_ms,
            },
            Some(log.cache.clone()),
        );
        Ok((Arc::new(log), commit))
    }

    fn recover(&self) -> Result<Vec<Recovered>, StorageError> {
        let per_shard: Vec<Result<Vec<Recovered>, StorageError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .shards
                .iter()
                .map(|shard| scope.spawn(move || self.recover_shard(shard)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StorageError::Corrupt {
                            what: "recovering a shard".into(),
                            detail: "the recovery thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut all = Vec::new();
        for shard in per_shard {
            all.extend(shard?);
        }
        Ok(all)
    }
}

/// One stream's log: a handle on its shard.
pub struct AcidLog {
    id: StreamId,
    /// Position of the log's first record (the fork anchor, or 0).
    log_start: u64,
    /// Only streams with a sliding TTL need their access time to survive a restart.
    persists_touches: bool,
    /// The last access time handed to the writer, to send at most one per interval.
    touch_sent_ms: AtomicU64,
    shard: Arc<Shard>,
    /// The newest committed records, filled by the shard's writer after each commit.
    cache: Arc<LogCache>,
}

/// A stream's RAM copies, shared by its log (reads) and the code that acknowledges writes (fills
/// them once a write is acknowledged, so that they never hold unacknowledged data).
#[derive(Debug)]
pub(crate) struct LogCache {
    state: Mutex<CacheState>,
    budget: Arc<CacheBudget>,
}

#[derive(Debug)]
struct CacheState {
    /// The newest records, within the shared budget (may be emptied).
    tail: TailCache,
    /// With the commit log: the records acknowledged but not yet in redb, which reads take from
    /// here (never dropped before redb has them).
    unflushed: VecDeque<(u64, Bytes)>,
    /// With the commit log: redb holds this stream's records below this position. Without it,
    /// `u64::MAX` (an acknowledged record is in redb).
    flushed: u64,
    /// The retained start: reads below it are refused (0 while nothing past the log start is
    /// released).
    released: u64,
}

impl LogCache {
    fn new(budget: Arc<CacheBudget>, flushed: u64, released: u64) -> LogCache {
        LogCache {
            state: Mutex::new(CacheState {
                tail: TailCache::default(),
                unflushed: VecDeque::new(),
                flushed,
                released,
            }),
            budget,
        }
    }

    fn push(&self, start: u64, data: &Bytes) {
        let mut state = self.state.lock();
        state.tail.push(start, Some(data.clone()), &self.budget);
        if state.flushed != u64::MAX {
            state.unflushed.push_back((start, data.clone()));
        }
    }

    fn clear(&self) {
        let mut state = self.state.lock();
        state.tail.clear(&self.budget);
        state.unflushed.clear();
    }

    /// The records before `before` are released (acknowledged): reads below it are refused
    /// from now on, and the RAM copies of those records are dropped.
    fn release(&self, before: u64) {
        let mut state = self.state.lock();
        if before <= state.released {
            return;
        }
        state.released = before;
        let CacheState {
            tail, unflushed, ..
        } = &mut *state;
        tail.drop_before(before, &self.budget);
        while unflushed
            .front()
            .is_some_and(|(start, data)| start + data.len() as u64 <= before)
        {
            unflushed.pop_front();
        }
    }

    /// redb now holds this stream's records below `end`.
    fn flushed(&self, end: u64) {
        let mut state = self.state.lock();
        while let Some((start, data)) = state.unflushed.front() {
            if start + data.len() as u64 > end {
                break;
            }
            state.unflushed.pop_front();
        }
        state.flushed = state.flushed.max(end);
    }
}

impl Drop for LogCache {
    fn drop(&mut self) {
        self.state.get_mut().tail.clear(&self.budget);
    }
}

impl std::fmt::Debug for AcidLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcidLog")
            .field("id", &self.id)
            .field("shard", &self.shard.index)
            .finish()
    }
}

impl StreamLog for AcidLog {
    fn append(&self, entry: AppendEntry) -> Commit {
        self.shard
            .submit(Op::Append { id: self.id, entry }, Some(self.cache.clone()))
    }

    fn mark_soft_deleted(&self) -> Commit {
        self.shard.submit(Op::SoftDelete { id: self.id }, None)
    }

    fn remove(&self) -> Commit {
        self.shard
            .submit(Op::Remove { id: self.id }, Some(self.cache.clone()))
    }

    fn release(&self, before: u64) -> Commit {
        if before <= self.log_start || before <= self.cache.state.lock().released {
            return super::done();
        }
        self.shard.submit(
            Op::Release {
                id: self.id,
                before,
            },
            Some(self.cache.clone()),
        )
    }

    fn touch(&self, now_ms: u64) {
        if !self.persists_touches {
            return;
        }
        let sent = self.touch_sent_ms.load(Ordering::Relaxed);
        if now_ms < sent.saturating_add(TOUCH_PERSIST_INTERVAL_MS) {
            return;
        }
        if self
            .touch_sent_ms
            .compare_exchange(sent, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.shard.send(Pending {
                op: Op::Touch {
                    id: self.id,
                    at_ms: now_ms,
                },
                cache: None,
                done: None,
                at: None,
            });
        }
    }

    fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> BoxFuture<'static, Result<ReadChunk, StorageError>> {
        if from >= until {
            return Box::pin(std::future::ready(Ok(ReadChunk {
                parts: Vec::new(),
                end: from,
            })));
        }
        match self.cache.ram_read(self.id, from, until, max_bytes, split) {
            FromRam::Served(read) => Box::pin(std::future::ready(read)),
            FromRam::InRedbBelow(flushed) => {
                let shard = self.shard.clone();
                let cache = self.cache.clone();
                let (id, log_start) = (self.id, self.log_start);
                Box::pin(async move {
                    read_stitched(
                        shard, cache, id, log_start, from, until, flushed, max_bytes, split,
                    )
                    .await
                })
            }
        }
    }
}

/// Where a read (or the rest of one) can be served from.
enum FromRam {
    Served(Result<ReadChunk, StorageError>),
    /// redb holds the stream's records below this position; the read starts below it.
    InRedbBelow(u64),
}

impl LogCache {
    fn ram_read(
        &self,
        id: StreamId,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> FromRam {
        let state = self.state.lock();
        if from < state.released {
            return FromRam::Served(Err(StorageError::Released {
                start: state.released,
            }));
        }
        if let Some(cached) = state.tail.read(from, until, max_bytes, split) {
            return FromRam::Served(cached);
        }
        if from < state.flushed {
            return FromRam::InRedbBelow(state.flushed);
        }
        // Acknowledged, not yet in redb: all of it is in the unflushed run.
        FromRam::Served(
            read_run(&state.unflushed, from, until, max_bytes, split).unwrap_or_else(|| {
                Err(StorageError::Corrupt {
                    what: format!("reading stream {id}"),
                    detail: format!(
                        "[{from}, {until}) is neither in redb (below {}) nor in RAM",
                        state.flushed
                    ),
                })
            }),
        )
    }
}

/// Reads from redb what it holds (below `flushed`), then goes on from RAM or redb for the rest
/// (with the commit log, the newest acknowledged records may not be in redb yet).
#[allow(clippy::too_many_arguments)]
async fn read_stitched(
    shard: Arc<Shard>,
    cache: Arc<LogCache>,
    id: StreamId,
    log_start: u64,
    from: u64,
    until: u64,
    mut flushed: u64,
    max_bytes: usize,
    split: bool,
) -> Result<ReadChunk, StorageError> {
    let mut parts = Vec::new();
    let mut pos = from;
    let mut budget = max_bytes;
    loop {
        let cap = until.min(flushed);
        let shard = shard.clone();
        let chunk = tokio::task::spawn_blocking(move || {
            let read = || {
                read_records(
                    &shard.db,
                    &shard.segments,
                    id,
                    log_start,
                    pos,
                    cap,
                    budget,
                    split,
                )
            };
            match read() {
                // A segment the read transaction's rows referenced was compacted and deleted
                // meanwhile: a newer transaction has the rows that replaced them.
                Err(e) if segments::is_gone(&e) => read(),
                other => other,
            }
        })
        .await
        .map_err(|e| StorageError::Io {
            what: format!("reading stream {id}"),
            source: std::io::Error::other(e.to_string()),
        })??;
        budget = budget.saturating_sub(chunk.parts.iter().map(Bytes::len).sum());
        parts.extend(chunk.parts);
        let stopped_short = chunk.end < cap || chunk.end == pos;
        pos = chunk.end;
        if stopped_short || pos >= until || budget == 0 {
            break;
        }
        // redb had all it held of the range; the rest is newer.
        match cache.ram_read(id, pos, until, budget, split) {
            FromRam::Served(rest) => {
                let rest = rest?;
                parts.extend(rest.parts);
                pos = rest.end;
                break;
            }
            // The flusher moved on meanwhile: redb has more now.
            FromRam::InRedbBelow(now) => flushed = now,
        }
    }
    Ok(ReadChunk { parts, end: pos })
}

/// Where a piece of a record read from `records` is.
#[derive(Clone, Copy)]
enum Piece {
    /// `len` bytes at `at` of the value of the read's `row`th row.
    Row { row: usize, at: usize, len: usize },
    /// A whole record in the commit log.
    Log { segment: u64, offset: u64 },
}

/// Reads `[from, until)` of stream `id` from one read transaction. Scans forward from the row
/// holding `from` and stops once the budget is covered, then lets [`plan_read`] apply the
/// contract's rules to the records of those rows.
#[allow(clippy::too_many_arguments)]
fn read_records(
    db: &Database,
    segments: &segments::LogSegments,
    id: StreamId,
    log_start: u64,
    from: u64,
    until: u64,
    max_bytes: usize,
    split: bool,
) -> Result<ReadChunk, StorageError> {
    // Before a fork's anchor there is nothing of this log, not even a record boundary.
    if from < log_start {
        return Err(StorageError::Misaligned { pos: from });
    }
    let what = format!("reading stream {id}");
    let corrupt = |start: u64, detail: &str| StorageError::Corrupt {
        what: format!("record row of stream {id} at {start}"),
        detail: detail.to_owned(),
    };
    let txn = db.begin_read().ctx(&what)?;
    let table = txn.open_table(RECORDS).ctx(&what)?;
    // The row holding `from` is the last one starting at or before it.
    let seek = match table.range((id, 0)..=(id, from)).ctx(&what)?.next_back() {
        Some(item) => item.ctx(&what)?.0.value().1,
        None => from,
    };
    // Each row is checked, and the bytes of it the read can serve copied out, as soon as redb has
    // read it: its page was just written by the kernel's copy and is still in the CPU's cache.
    // Checked and copied after the whole scan, a 4 MiB read's pages were read back from memory
    // twice (`perf`: the checksum and the copy were 11% each of the server's time in catch-up).
    //
    // `buf` holds the stream's bytes from `from` on, at most the budget of them: one buffer for
    // the whole read rather than one allocation per record (large fresh allocations are what
    // catch-up reads spent their time on: page faults).
    let mut buf: Vec<u8> = Vec::with_capacity(
        max_bytes.min(usize::try_from(until.saturating_sub(from)).unwrap_or(usize::MAX)),
    );
    let mut rows = Vec::new();
    // The pieces of the rows' entries, and the records they make up: (position, length, first
    // piece). A record split across rows has a piece in each; a referenced record is one piece.
    let mut pieces_of: Vec<Piece> = Vec::new();
    let mut records: Vec<(u64, u64, usize)> = Vec::new();
    // The scan's first row goes on with a record that began in an earlier row: its first piece is
    // the rest of that record (`from` may not lie in it unless the read may split records).
    let mut head_rest = None;
    let mut last_continues = false;
    let mut in_range = 0usize;
    for item in table.range((id, seek)..(id, until)).ctx(&what)? {
        let (key, value) = item.ctx(&what)?;
        let start = key.value().1;
        let raw = value.value();
        // The row's checksum is checked here, before any of its bytes are served.
        let row = codec::read_row(id, start, raw)?;
        let joins = row.joins();
        if rows.is_empty() {
            if joins.first_continues {
                head_rest = Some(start);
            }
        } else if joins.first_continues != last_continues {
            return Err(corrupt(start, "does not join the row before it"));
        }
        let base = raw.as_ptr() as usize;
        let mut pos = start;
        for (k, entry) in row.entries().enumerate() {
            let piece = match entry {
                codec::Entry::Inline(bytes) => Piece::Row {
                    row: rows.len(),
                    at: bytes.as_ptr() as usize - base,
                    len: bytes.len(),
                },
                codec::Entry::At {
                    segment, offset, ..
                } => Piece::Log { segment, offset },
            };
            let len = entry.len() as u64;
            match records.last_mut() {
                Some(last) if k == 0 && joins.first_continues => last.1 += len,
                _ => records.push((pos, len, pieces_of.len())),
            }
            pieces_of.push(piece);
            pos += len;
        }
        let end = start + row.data_len();
        let (lo, hi) = (start.max(from), end.min(until));
        // Bytes held in the row are copied out; referenced ones are lent from the log below.
        if let Some(data) = row.data()
            && lo < hi
            && lo == from + buf.len() as u64
            && buf.len() < max_bytes
        {
            let take = ((hi - lo) as usize).min(max_bytes - buf.len());
            let skip = (lo - start) as usize;
            buf.extend_from_slice(&data[skip..skip + take]);
        }
        last_continues = joins.last_continues;
        rows.push(value);
        in_range += (end.min(until).saturating_sub(start.max(from))) as usize;
        // A read that may not split records reads on to the end of the last one.
        if in_range >= max_bytes.max(1) && (split || !last_continues) {
            break;
        }
    }
    if let (Some(start), false) = (head_rest, split) {
        // Only the first record's start is unknown; `from` inside it is not a record boundary.
        if records.first().is_some_and(|r| from < r.0 + r.1) {
            return Err(StorageError::Misaligned { pos: from });
        }
        debug_assert!(records.first().is_some_and(|r| r.0 == start));
    }
    let count = records.len();
    let span = |i: usize| (records[i].0, records[i].1);
    let (pieces, end) = plan_read(count, span, log_start, from, until, max_bytes, split)?;
    // The last record goes on past `until` (only a client-made fork offset puts `until` inside a
    // record): a read that may not split records cannot end inside it.
    if last_continues && !split && pieces.last().is_some_and(|p| p.record + 1 == count) {
        return Err(StorageError::Misaligned { pos: until });
    }
    // The parts are slices of `buf`; a part beyond it (a first record larger than the budget,
    // which a read that may not split records serves whole) is copied from its rows now.
    let copied = from + buf.len() as u64;
    let buf = Bytes::from(buf);
    let mut rest = Vec::new();
    let mut parts: Vec<Bytes> = Vec::with_capacity(pieces.len());
    let mut later = Vec::new();
    let mut open_segment = None;
    for piece in &pieces {
        let (pos, _, first) = records[piece.record];
        let lo = pos + piece.skip as u64;
        if lo >= from && lo + piece.len as u64 <= copied {
            let at = (lo - from) as usize;
            parts.push(buf.slice(at..at + piece.len));
            continue;
        }
        if let Piece::Log { segment, offset } = pieces_of[first] {
            parts.push(segments.read_via(
                &mut open_segment,
                segment,
                offset + piece.skip as u64,
                piece.len,
            )?);
            continue;
        }
        later.push((parts.len(), rest.len()));
        parts.push(Bytes::new());
        // The record's bytes [skip, skip + len), gathered from its pieces.
        let (mut skip, mut len) = (piece.skip, piece.len);
        for p in &pieces_of[first..] {
            if len == 0 {
                break;
            }
            let &Piece::Row { row, at, len: n } = p else {
                return Err(corrupt(pos, "a record held in rows goes on in a reference"));
            };
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(len);
            rest.extend_from_slice(&rows[row].value()[at + skip..at + skip + take]);
            skip = 0;
            len -= take;
        }
    }
    if !later.is_empty() {
        let rest = Bytes::from(rest);
        for (part, at) in later {
            let len = pieces[part].len;
            parts[part] = rest.slice(at..at + len);
        }
    }
    Ok(ReadChunk { parts, end })
}
