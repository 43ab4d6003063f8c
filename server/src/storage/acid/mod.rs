//! `acid`: streams live in redb databases, one per shard; acknowledged means committed in a redb
//! write transaction with immediate durability (synced to disk).
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
mod gate;
mod layout;
mod writer;

#[cfg(test)]
mod tests;

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

use super::tail_cache::{CacheBudget, TailCache};
use super::{
    AppendEntry, Commit, ProducerState, ProducerTuple, ReadChunk, Recovered, Storage, StorageError,
    StreamId, StreamLog, StreamMeta, WriterSnapshot, plan_read,
};
use writer::{Op, Pending, WriterStats};

/// Stream id → the stream's configuration (JSON + CRC-32C), written once at creation.
const STREAMS: TableDefinition<u64, &[u8]> = TableDefinition::new("streams");
/// Stream id → the small writer-state row ([`codec::StateRow`]), rewritten once per transaction
/// that changes the stream.
const STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("state");
/// (stream id, producer id) → (epoch, last seq); only the producer an append names is written.
const PRODUCERS: TableDefinition<(u64, &str), (u64, u64)> = TableDefinition::new("producers");
/// (stream id, start position) → record data + CRC-32C.
const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");

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
}

/// The redb-backed, sharded backend.
pub struct AcidStorage {
    dir: PathBuf,
    shards: Vec<Arc<Shard>>,
    /// Shared by the tail caches of all streams.
    cache: Arc<CacheBudget>,
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
}

impl Shard {
    fn open(
        dir: &Path,
        index: usize,
        cache_bytes: usize,
        gate: Option<Arc<gate::CommitGate>>,
    ) -> Result<Shard, StorageError> {
        let path = layout::shard_file(dir, index);
        let what = format!("opening {}", path.display());
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .ctx(&what)?;
        // Create the tables up front so that readers can always open them.
        let txn = db.begin_write().ctx(&what)?;
        txn.open_table(STREAMS).ctx(&what)?;
        txn.open_table(STATE).ctx(&what)?;
        txn.open_table(PRODUCERS).ctx(&what)?;
        txn.open_table(RECORDS).ctx(&what)?;
        txn.commit().ctx(&what)?;
        let db = Arc::new(db);
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
        })
    }

    /// Queues `op` and returns the future of its commit. The write happens whether or not the
    /// future is polled or dropped.
    fn submit(&self, op: Op) -> Commit {
        let (done, answer) = oneshot::channel();
        if !self.send(Pending {
            op,
            done: Some(done),
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
        let s = self.stats();
        let per_txn = |micros: u64| micros / s.transactions.max(1);
        tracing::info!(
            transactions = s.transactions,
            operations = s.operations,
            ops_per_transaction =
                format!("{:.1}", s.operations as f64 / s.transactions.max(1) as f64),
            apply_us_per_transaction = per_txn(s.apply_micros),
            commit_us_per_transaction = per_txn(s.commit_micros),
            "acid store closed"
        );
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
        let gate = gate::CommitGate::for_machine(shard_count as usize);
        // Opening a shard after a crash makes redb repair it, which reads the whole file: do the
        // shards side by side.
        let opened: Vec<Result<Shard, StorageError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..shard_count as usize)
                .map(|index| {
                    let gate = gate.clone();
                    scope.spawn(move || Shard::open(dir, index, cache_bytes, gate))
                })
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
        let shards = opened
            .into_iter()
            .map(|s| s.map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        // New shard files must survive a crash before anything in them is acknowledged.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StorageError::Io {
                what: format!("syncing directory {}", dir.display()),
                source,
            })?;
        Ok(AcidStorage {
            dir: dir.to_owned(),
            shards,
            cache: Arc::new(CacheBudget::new(options.cache_bytes)),
        })
    }

    /// Transactions and operations committed since the store was opened.
    pub fn stats(&self) -> AcidStats {
        let mut total = AcidStats::default();
        for shard in &self.shards {
            total.transactions += shard.stats.transactions.load(Ordering::Relaxed);
            total.operations += shard.stats.operations.load(Ordering::Relaxed);
            total.apply_micros += shard.stats.apply_micros.load(Ordering::Relaxed);
            total.commit_micros += shard.stats.commit_micros.load(Ordering::Relaxed);
        }
        total
    }

    fn shard_of(&self, id: StreamId) -> &Arc<Shard> {
        &self.shards[layout::shard_of(id, self.shards.len() as u32)]
    }

    fn log_for(&self, meta: &StreamMeta) -> AcidLog {
        AcidLog {
            id: meta.id,
            log_start: meta.fork.as_ref().map_or(0, |f| f.offset),
            persists_touches: meta.ttl_secs.is_some(),
            touch_sent_ms: AtomicU64::new(0),
            shard: self.shard_of(meta.id).clone(),
            cache: Arc::new(LogCache {
                tail: Mutex::new(TailCache::default()),
                budget: self.cache.clone(),
            }),
        }
    }

    fn recover_shard(&self, shard: &Arc<Shard>) -> Result<Vec<Recovered>, StorageError> {
        let what = format!("recovering shard {}", shard.index);
        let txn = shard.db.begin_read().ctx(&what)?;
        let streams = txn.open_table(STREAMS).ctx(&what)?;
        let state = txn.open_table(STATE).ctx(&what)?;
        let producers = txn.open_table(PRODUCERS).ctx(&what)?;
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
            let log = self.log_for(&meta);
            // The last record must end exactly at the tail the same transactions wrote.
            let stored_end = match records
                .range((id, 0)..=(id, u64::MAX))
                .ctx(&what)?
                .next_back()
            {
                Some(item) => {
                    let (k, v) = item.ctx(&what)?;
                    k.value().1 + codec::record_data_len(v.value().len()) as u64
                }
                None => log.log_start,
            };
            if stored_end != row.tail || row.tail - log.log_start != row.own_bytes {
                return Err(corrupt(format!(
                    "records end at {stored_end}, state says tail {} with {} own bytes from {}",
                    row.tail, row.own_bytes, log.log_start
                )));
            }
            let mut snapshot = WriterSnapshot {
                tail: row.tail,
                closed: row.closed,
                closed_by: row.closed_by,
                last_seq: row.last_seq,
                producers: Default::default(),
                soft_deleted: row.soft_deleted,
                last_access_ms: row.last_access_ms,
                own_bytes: row.own_bytes,
            };
            for item in producers.range((id, "")..).ctx(&what)? {
                let (k, v) = item.ctx(&what)?;
                let (stream, producer) = k.value();
                if stream != id {
                    break;
                }
                let (epoch, last_seq) = v.value();
                snapshot
                    .producers
                    .insert(producer.to_owned(), ProducerState { epoch, last_seq });
            }
            log.touch_sent_ms
                .store(row.last_access_ms, Ordering::Relaxed);
            found.push(Recovered {
                meta,
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

    fn create(
        &self,
        meta: &StreamMeta,
        initial: Vec<Bytes>,
        close: Option<Option<ProducerTuple>>,
    ) -> Result<(Arc<dyn StreamLog>, Commit), StorageError> {
        let log = self.log_for(meta);
        log.touch_sent_ms
            .store(meta.created_at_ms, Ordering::Relaxed);
        let commit = log.shard.submit(Op::Create {
            id: meta.id,
            meta: codec::encode_meta(meta),
            start: log.log_start,
            initial,
            close,
            created_at_ms: meta.created_at_ms,
            cache: log.cache.clone(),
        });
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

/// A stream's tail cache, shared by its log (reads) and its shard's writer (fills it once a
/// commit succeeds, so that it never holds unacknowledged data).
#[derive(Debug)]
pub(crate) struct LogCache {
    tail: Mutex<TailCache>,
    budget: Arc<CacheBudget>,
}

impl LogCache {
    fn push(&self, start: u64, data: &Bytes) {
        self.tail
            .lock()
            .push(start, Some(data.clone()), &self.budget);
    }

    fn clear(&self) {
        self.tail.lock().clear(&self.budget);
    }
}

impl Drop for LogCache {
    fn drop(&mut self) {
        self.tail.get_mut().clear(&self.budget);
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
        self.shard.submit(Op::Append {
            id: self.id,
            entry,
            cache: self.cache.clone(),
        })
    }

    fn mark_soft_deleted(&self) -> Commit {
        self.shard.submit(Op::SoftDelete { id: self.id })
    }

    fn remove(&self) -> Commit {
        self.shard.submit(Op::Remove {
            id: self.id,
            cache: self.cache.clone(),
        })
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
                done: None,
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
        if let Some(cached) = self.cache.tail.lock().read(from, until, max_bytes, split) {
            return Box::pin(std::future::ready(cached));
        }
        let db = self.shard.db.clone();
        let (id, log_start) = (self.id, self.log_start);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                read_records(&db, id, log_start, from, until, max_bytes, split)
            })
            .await
            .map_err(|e| StorageError::Io {
                what: format!("reading stream {id}"),
                source: std::io::Error::other(e.to_string()),
            })?
        })
    }
}

/// Reads `[from, until)` of stream `id` from one read transaction. Scans forward from the record
/// holding `from` and stops once the budget is covered, then lets [`plan_read`] apply the
/// contract's rules to that window.
fn read_records(
    db: &Database,
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
    let txn = db.begin_read().ctx(&what)?;
    let records = txn.open_table(RECORDS).ctx(&what)?;
    // The record holding `from` is the last one starting at or before it.
    let seek = match records.range((id, 0)..=(id, from)).ctx(&what)?.next_back() {
        Some(item) => item.ctx(&what)?.0.value().1,
        None => from,
    };
    let mut window = Vec::new();
    let mut in_range = 0usize;
    for item in records.range((id, seek)..(id, until)).ctx(&what)? {
        let (key, value) = item.ctx(&what)?;
        let start = key.value().1;
        let end = start + codec::record_data_len(value.value().len()) as u64;
        window.push((start, value));
        in_range += (end.min(until).saturating_sub(start.max(from))) as usize;
        if in_range >= max_bytes.max(1) {
            break;
        }
    }
    let span = |i: usize| {
        let (start, value) = &window[i];
        (*start, codec::record_data_len(value.value().len()) as u64)
    };
    let (pieces, end) = plan_read(window.len(), span, log_start, from, until, max_bytes, split)?;
    // One buffer for the whole read rather than one allocation per record: large fresh
    // allocations are what catch-up reads spent their time on (page faults).
    let mut buf = Vec::with_capacity(pieces.iter().map(|p| p.len).sum());
    for piece in &pieces {
        let (start, value) = &window[piece.record];
        let data = codec::read_record(id, *start, value.value())?;
        buf.extend_from_slice(&data[piece.skip..piece.skip + piece.len]);
    }
    let buf = Bytes::from(buf);
    let mut at = 0;
    let parts = pieces
        .iter()
        .map(|p| {
            at += p.len;
            buf.slice(at - p.len..at)
        })
        .collect();
    Ok(ReadChunk { parts, end })
}
