//! One writer thread per shard: it owns the shard's write side, drains every operation that
//! queued up while the previous commit was syncing, applies them all in one redb write transaction
//! and commits it once (group commit), then answers each operation in submission order.
//!
//! It is the only code that writes to a shard, so it keeps the state row of each stream it has
//! touched in memory and never reads-modifies-writes through redb on the hot path.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::codec::{self, StateRow};
use super::gate::{CommitGate, Waiter};
use super::{DbResult, LogCache, PRODUCERS, RECORDS, STATE, STREAMS};
use crate::storage::{AppendEntry, ProducerTuple, StorageError, StreamId};

/// Most operations one transaction takes, so that one commit's latency stays bounded.
const MAX_BATCH_OPS: usize = 4096;
/// Most record bytes one transaction takes (a single larger operation still goes alone).
const MAX_BATCH_BYTES: usize = 32 << 20;

/// What the writer thread is asked to persist.
pub(super) enum Op {
    Create {
        id: StreamId,
        meta: Vec<u8>,
        start: u64,
        initial: Vec<Bytes>,
        close: Option<Option<ProducerTuple>>,
        created_at_ms: u64,
        cache: Arc<LogCache>,
    },
    Append {
        id: StreamId,
        entry: AppendEntry,
        cache: Arc<LogCache>,
    },
    SoftDelete {
        id: StreamId,
    },
    Remove {
        id: StreamId,
        cache: Arc<LogCache>,
    },
    /// A sliding-TTL access time; best effort, committed without a sync when nothing else is.
    Touch {
        id: StreamId,
        at_ms: u64,
    },
}

impl Op {
    fn data_bytes(&self) -> usize {
        match self {
            Op::Create { initial, .. } => initial.iter().map(Bytes::len).sum(),
            Op::Append { entry, .. } => entry.data.as_ref().map_or(0, Bytes::len),
            _ => 0,
        }
    }

    /// Brings the stream's tail cache up to date once this operation has committed.
    fn committed(&self) {
        match self {
            Op::Create {
                start,
                initial,
                cache,
                ..
            } => {
                let mut pos = *start;
                for data in initial.iter().filter(|d| !d.is_empty()) {
                    cache.push(pos, data);
                    pos += data.len() as u64;
                }
            }
            Op::Append { entry, cache, .. } => {
                if let Some(data) = entry.data.as_ref().filter(|d| !d.is_empty()) {
                    cache.push(entry.start, data);
                }
            }
            Op::Remove { cache, .. } => cache.clear(),
            Op::SoftDelete { .. } | Op::Touch { .. } => {}
        }
    }
}

/// An operation and who waits for it (touches have nobody).
pub(super) struct Pending {
    pub op: Op,
    pub done: Option<oneshot::Sender<Result<(), StorageError>>>,
}

/// Counters the writer keeps, for metrics and for tests that prove batching.
#[derive(Debug, Default)]
pub(super) struct WriterStats {
    pub transactions: AtomicU64,
    pub operations: AtomicU64,
    /// Time spent building transactions and committing them, for finding where a batch goes.
    pub apply_micros: AtomicU64,
    pub commit_micros: AtomicU64,
}

/// The outcome of one operation inside a transaction: `Err` rejects only that operation (it
/// changed nothing); a failure that may have changed the transaction is returned by the outer
/// `Result` of [`apply`] instead and aborts the whole transaction.
type OpResult = Result<(), StorageError>;

struct Tables<'t> {
    streams: Table<'t, u64, &'static [u8]>,
    state: Table<'t, u64, &'static [u8]>,
    producers: Table<'t, (u64, &'static str), (u64, u64)>,
    records: Table<'t, (u64, u64), &'static [u8]>,
}

/// The writer thread's body: runs until every sender is gone. With a `gate`, a commit may wait
/// for one of its permits; what queues up meanwhile joins the transaction.
pub(super) fn run(
    db: Arc<Database>,
    ops: Receiver<Pending>,
    stats: Arc<WriterStats>,
    gate: Option<Arc<CommitGate>>,
) {
    let mut rows: HashMap<StreamId, StateRow> = HashMap::new();
    let mut batch: Vec<Pending> = Vec::new();
    let me = Waiter::current();
    while let Ok(first) = ops.recv() {
        let mut bytes = first.op.data_bytes();
        batch.push(first);
        let permit = gate.as_ref().map(|g| g.enter(&me));
        while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match ops.try_recv() {
                Ok(next) => {
                    bytes += next.op.data_bytes();
                    batch.push(next);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let results = commit_batch(&db, &mut rows, &batch, &stats);
        drop(permit);
        if let Some(gate) = &gate {
            gate.finished(batch.len());
        }
        for (pending, result) in batch.drain(..).zip(results) {
            match &result {
                Ok(()) => pending.op.committed(),
                Err(e) => tracing::error!(error = %e, "acid write failed"),
            }
            if let Some(done) = pending.done {
                // The waiter may have gone (client hung up); the write stands regardless.
                let _ = done.send(result);
            }
        }
    }
}

/// Commits `batch` in one transaction. If that transaction fails, each operation is retried
/// alone so one bad operation (say, a value redb refuses) does not fail its neighbours; after an
/// I/O error redb refuses every later write, so the retries fail fast and nothing is half-done.
fn commit_batch(
    db: &Database,
    rows: &mut HashMap<StreamId, StateRow>,
    batch: &[Pending],
    stats: &WriterStats,
) -> Vec<OpResult> {
    match commit(db, rows, batch, stats) {
        Ok(results) => results,
        Err(e) => {
            // The cached rows may hold changes that were never committed.
            rows.clear();
            if batch.len() == 1 {
                return vec![Err(e)];
            }
            tracing::warn!(error = %e, ops = batch.len(), "acid batch failed; retrying one by one");
            batch
                .iter()
                .map(|p| match commit(db, rows, std::slice::from_ref(p), stats) {
                    Ok(mut r) => r.pop().unwrap_or(Ok(())),
                    Err(e) => {
                        rows.clear();
                        Err(e)
                    }
                })
                .collect()
        }
    }
}

fn commit(
    db: &Database,
    rows: &mut HashMap<StreamId, StateRow>,
    batch: &[Pending],
    stats: &WriterStats,
) -> Result<Vec<OpResult>, StorageError> {
    let mut txn = db.begin_write().ctx("beginning a write transaction")?;
    // Touches alone need no sync: they are a best-effort hint and the next durable commit
    // carries them to disk.
    let durability = if batch.iter().all(|p| matches!(p.op, Op::Touch { .. })) {
        Durability::None
    } else {
        Durability::Immediate
    };
    txn.set_durability(durability)
        .map_err(|e| StorageError::Corrupt {
            what: "setting durability".into(),
            detail: e.to_string(),
        })?;
    let began = std::time::Instant::now();
    let results = apply(&txn, rows, batch)?;
    let applied = std::time::Instant::now();
    txn.commit().ctx("committing a write transaction")?;
    stats
        .apply_micros
        .fetch_add((applied - began).as_micros() as u64, Ordering::Relaxed);
    stats
        .commit_micros
        .fetch_add(applied.elapsed().as_micros() as u64, Ordering::Relaxed);
    stats.transactions.fetch_add(1, Ordering::Relaxed);
    stats
        .operations
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    Ok(results)
}

fn apply(
    txn: &WriteTransaction,
    rows: &mut HashMap<StreamId, StateRow>,
    batch: &[Pending],
) -> Result<Vec<OpResult>, StorageError> {
    let mut t = Tables {
        streams: txn.open_table(STREAMS).ctx("opening table streams")?,
        state: txn.open_table(STATE).ctx("opening table state")?,
        producers: txn.open_table(PRODUCERS).ctx("opening table producers")?,
        records: txn.open_table(RECORDS).ctx("opening table records")?,
    };
    // Streams whose state row changed; each row is written once per transaction however many
    // appends the stream had in it.
    let mut dirty: Vec<StreamId> = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    for pending in batch {
        results.push(apply_one(&mut t, rows, &pending.op, &mut dirty)?);
    }
    dirty.sort_unstable();
    dirty.dedup();
    for id in dirty {
        if let Some(row) = rows.get(&id) {
            t.state
                .insert(id, row.encode().as_slice())
                .ctx("writing a state row")?;
        }
    }
    Ok(results)
}

/// The cached state row of `id`, loaded from the table on first use.
fn row_of<'r>(
    rows: &'r mut HashMap<StreamId, StateRow>,
    state: &Table<'_, u64, &'static [u8]>,
    id: StreamId,
) -> Result<Option<&'r mut StateRow>, StorageError> {
    match rows.entry(id) {
        Entry::Occupied(cached) => Ok(Some(cached.into_mut())),
        Entry::Vacant(slot) => {
            let Some(raw) = state.get(id).ctx("reading a state row")? else {
                return Ok(None);
            };
            Ok(Some(slot.insert(StateRow::decode(id, raw.value())?)))
        }
    }
}

fn put_record(
    records: &mut Table<'_, (u64, u64), &'static [u8]>,
    id: StreamId,
    start: u64,
    data: &[u8],
) -> Result<(), StorageError> {
    let mut slot = records
        .insert_reserve((id, start), codec::record_value_len(data.len()))
        .ctx("writing a record")?;
    codec::write_record(slot.as_mut(), id, start, data);
    Ok(())
}

fn apply_one(
    t: &mut Tables<'_>,
    rows: &mut HashMap<StreamId, StateRow>,
    op: &Op,
    dirty: &mut Vec<StreamId>,
) -> Result<OpResult, StorageError> {
    match op {
        Op::Create {
            id,
            meta,
            start,
            initial,
            close,
            created_at_ms,
            ..
        } => {
            let id = *id;
            if row_of(rows, &t.state, id)?.is_some() {
                return Ok(Err(StorageError::Corrupt {
                    what: format!("stream {id}"),
                    detail: "created twice".into(),
                }));
            }
            t.streams
                .insert(id, meta.as_slice())
                .ctx("writing stream metadata")?;
            let mut pos = *start;
            for data in initial.iter().filter(|d| !d.is_empty()) {
                put_record(&mut t.records, id, pos, data)?;
                pos += data.len() as u64;
            }
            rows.insert(
                id,
                StateRow {
                    tail: pos,
                    own_bytes: pos - start,
                    last_access_ms: *created_at_ms,
                    closed: close.is_some(),
                    soft_deleted: false,
                    closed_by: close.clone().flatten(),
                    last_seq: None,
                },
            );
            dirty.push(id);
        }
        Op::Append { id, entry, .. } => {
            let id = *id;
            let Some(row) = row_of(rows, &t.state, id)? else {
                return Ok(Err(StorageError::Removed(id)));
            };
            // The stream layer assigns offsets; a gap or overlap here is a bug upstream (or a
            // failed earlier append), and storing it would corrupt every later read.
            if entry.start != row.tail {
                return Ok(Err(StorageError::Corrupt {
                    what: format!("append to stream {id}"),
                    detail: format!(
                        "starts at {} but the stored tail is {}",
                        entry.start, row.tail
                    ),
                }));
            }
            let data = entry.data.as_ref().filter(|d| !d.is_empty());
            if row.closed {
                return Ok(Err(StorageError::Corrupt {
                    what: format!("append to stream {id}"),
                    detail: "the stream is closed".into(),
                }));
            }
            if let Some(data) = data {
                row.tail += data.len() as u64;
                row.own_bytes += data.len() as u64;
            }
            if let Some(seq) = &entry.stream_seq {
                row.last_seq = Some(seq.clone());
            }
            if let Some(by) = &entry.close {
                row.closed = true;
                row.closed_by = by.clone();
            }
            if let Some(data) = data {
                put_record(&mut t.records, id, entry.start, data)?;
            }
            if let Some((producer, ps)) = &entry.producer {
                t.producers
                    .insert((id, producer.as_str()), (ps.epoch, ps.last_seq))
                    .ctx("writing producer state")?;
            }
            dirty.push(id);
        }
        Op::SoftDelete { id } => {
            let Some(row) = row_of(rows, &t.state, *id)? else {
                return Ok(Err(StorageError::Removed(*id)));
            };
            row.soft_deleted = true;
            dirty.push(*id);
        }
        Op::Touch { id, at_ms } => {
            if let Some(row) = row_of(rows, &t.state, *id)? {
                row.last_access_ms = row.last_access_ms.max(*at_ms);
                dirty.push(*id);
            }
        }
        Op::Remove { id, .. } => {
            let id = *id;
            rows.remove(&id);
            t.records
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                .ctx("removing records")?;
            let producers: Vec<String> = t
                .producers
                .range((id, "")..)
                .ctx("listing producers")?
                .map_while(|item| match item {
                    Ok((k, _)) if k.value().0 == id => Some(Ok(k.value().1.to_owned())),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .ctx("listing producers")?;
            for producer in &producers {
                t.producers
                    .remove((id, producer.as_str()))
                    .ctx("removing producer state")?;
            }
            t.state.remove(id).ctx("removing a state row")?;
            t.streams.remove(id).ctx("removing stream metadata")?;
        }
    }
    Ok(Ok(()))
}
