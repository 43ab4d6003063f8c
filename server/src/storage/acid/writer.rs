//! One writer thread per shard: it owns the shard's write side, drains every operation that
//! queued up while the previous commit was syncing, applies them all in one redb write transaction
//! and commits it once (group commit), then answers each operation in submission order.
//!
//! It is the only code that writes to a shard, so it keeps the state row of each stream it has
//! touched in memory and never reads-modifies-writes through redb on the hot path.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::oneshot;

use super::codec::{self, StateRow};
use super::gate::{CommitGate, Waiter};
use super::{
    CHECKPOINT, DbResult, LAST_RECORD, LogCache, PRODUCER_USED, PRODUCERS, RECORDS, REPLAY_FROM,
    STATE, STREAMS,
};
use crate::storage::{AppendEntry, ProducerTuple, StorageError, StreamId};

/// Most operations one transaction takes, so that one commit's latency stays bounded.
const MAX_BATCH_OPS: usize = 4096;
/// Most record bytes one transaction takes (a single larger operation still goes alone).
const MAX_BATCH_BYTES: usize = 32 << 20;
/// Most state rows a per-shard writer keeps in RAM (64 bytes each, in a table up to half
/// empty): past it they are dropped and read back as streams are written again. A handful in
/// unit tests, so that the per-shard tests read rows back all the time.
const MAX_CACHED_ROWS: usize = if cfg!(test) { 4 } else { 16 << 10 };

/// What the writer thread is asked to persist (and what the commit log records).
pub(super) enum Op {
    Create {
        id: StreamId,
        meta: Vec<u8>,
        start: u64,
        initial: Vec<Bytes>,
        close: Option<Option<ProducerTuple>>,
        created_at_ms: u64,
    },
    Append {
        id: StreamId,
        entry: AppendEntry,
    },
    SoftDelete {
        id: StreamId,
    },
    Remove {
        id: StreamId,
    },
    /// The stream's records before `before` are released: rows that end by then are deleted.
    Release {
        id: StreamId,
        before: u64,
    },
    /// A sliding-TTL access time; best effort, committed without a sync when nothing else is.
    Touch {
        id: StreamId,
        at_ms: u64,
    },
}

impl Op {
    /// The stream the operation is for.
    pub(super) fn id(&self) -> StreamId {
        match self {
            Op::Create { id, .. }
            | Op::Append { id, .. }
            | Op::SoftDelete { id }
            | Op::Remove { id }
            | Op::Release { id, .. }
            | Op::Touch { id, .. } => *id,
        }
    }

    /// Where the stream's data ends once the operation is applied, for operations that add data.
    pub(super) fn end(&self) -> Option<u64> {
        match self {
            Op::Create { start, initial, .. } => {
                Some(start + initial.iter().map(|d| d.len() as u64).sum::<u64>())
            }
            Op::Append { entry, .. } => entry.data.as_ref().map(|d| entry.start + d.len() as u64),
            _ => None,
        }
    }

    /// Bytes of record data the operation adds.
    pub(super) fn data_bytes(&self) -> usize {
        match self {
            Op::Create { initial, .. } => initial.iter().map(Bytes::len).sum(),
            Op::Append { entry, .. } => entry.data.as_ref().map_or(0, Bytes::len),
            _ => 0,
        }
    }
}

/// Where an operation's first record is in the commit log: its segment, and the offset of its
/// bytes in that segment. A create's later initial records follow it, each behind its 4-byte
/// length ([`super::commit_log`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LogAt {
    pub segment: u64,
    pub offset: u64,
}

/// An operation, the tail cache of its stream, who waits for it (touches and replayed
/// operations have nobody), and where the commit log holds its records (once it does).
pub(super) struct Pending {
    pub op: Op,
    pub cache: Option<Arc<LogCache>>,
    pub done: Option<oneshot::Sender<Result<(), StorageError>>>,
    pub at: Option<LogAt>,
}

impl Pending {
    /// Brings the stream's tail cache up to date once this operation is acknowledged.
    pub(super) fn committed(&self) {
        let Some(cache) = &self.cache else { return };
        match &self.op {
            Op::Create { start, initial, .. } => {
                let mut pos = *start;
                for data in initial.iter().filter(|d| !d.is_empty()) {
                    cache.push(pos, data);
                    pos += data.len() as u64;
                }
            }
            Op::Append { entry, .. } => {
                if let Some(data) = entry.data.as_ref().filter(|d| !d.is_empty()) {
                    cache.push(entry.start, data);
                }
            }
            Op::Remove { .. } => cache.clear(),
            Op::Release { before, .. } => cache.release(*before),
            Op::SoftDelete { .. } | Op::Touch { .. } => {}
        }
    }
}

/// Counters the writer keeps, for metrics and for tests that prove batching.
#[derive(Debug, Default)]
pub(super) struct WriterStats {
    pub transactions: AtomicU64,
    pub operations: AtomicU64,
    /// Time spent building transactions and committing them, for finding where a batch goes.
    pub apply_micros: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Bytes of referenced records whose rows were deleted (released, removed or compacted):
    /// commit log segments may have become deletable.
    pub freed_ref_bytes: AtomicU64,
}

/// The outcome of one operation inside a transaction: `Err` rejects only that operation (it
/// changed nothing); a failure that may have changed the transaction is returned by the outer
/// `Result` of [`apply`] instead and aborts the whole transaction.
pub(super) type OpResult = Result<(), StorageError>;

struct Tables<'t> {
    streams: Table<'t, u64, &'static [u8]>,
    state: Table<'t, u64, &'static [u8]>,
    producers: Table<'t, (u64, &'static str), (u64, u64)>,
    producer_used: Table<'t, (u64, &'static str), u64>,
    records: Table<'t, (u64, u64), &'static [u8]>,
}

/// Records of at least this many bytes are kept in the commit log and referenced from their
/// rows (when the log holds them: with the commit log); smaller ones are copied into their
/// rows, where a read of many of them is one copy of a row rather than a slice per record.
pub const REF_MIN_BYTES: usize = 4096;

/// The writer thread's body (per-shard syncs): runs until every sender is gone. With a `gate`,
/// a commit may wait for one of its permits; what queues up meanwhile joins the transaction.
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
        let permit = gate.as_ref().map(|g| g.enter(&me));
        drain(first, &ops, &mut batch);
        let results = commit_batch(&db, &mut rows, &batch, &stats);
        // Every row here is also committed in the shard (each transaction writes the rows it
        // changed), so this is only a cache: bounded, it does not keep a row for every stream
        // written since start-up. A row dropped is read back on its stream's next write.
        if rows.len() > MAX_CACHED_ROWS {
            rows = HashMap::new();
        }
        crate::metrics::storage_batch(batch.len());
        drop(permit);
        if let Some(gate) = &gate {
            gate.finished(batch.len());
        }
        for (pending, result) in batch.drain(..).zip(results) {
            match &result {
                Ok(()) => pending.committed(),
                Err(e) => tracing::error!(error = %e, "acid write failed"),
            }
            if let Some(done) = pending.done {
                // The waiter may have gone (client hung up); the write stands regardless.
                let _ = done.send(result);
            }
        }
    }
}

/// Takes what queued up behind `first`, within the batch limits.
pub(super) fn drain(first: Pending, ops: &Receiver<Pending>, batch: &mut Vec<Pending>) {
    let mut bytes = first.op.data_bytes();
    batch.push(first);
    while batch.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
        match ops.try_recv() {
            Ok(next) => {
                bytes += next.op.data_bytes();
                batch.push(next);
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
}

/// A durable commit holding the state rows changed since the last one and the number of the
/// commit log's last record applied: from here on, the log up to that record is not needed.
///
/// `replay_from` is the commit log segment holding the record after `lsn` (or an earlier one):
/// start-up replays from there; earlier segments are only kept for what rows reference.
pub(super) fn checkpoint(
    db: &Database,
    rows: &HashMap<StreamId, StateRow>,
    unsaved: &mut HashSet<StreamId>,
    lsn: u64,
    replay_from: u64,
) -> Result<(), StorageError> {
    let mut txn = db.begin_write().ctx("beginning a checkpoint")?;
    // Quick repair: the commit also saves redb's allocator state (and commits in two phases),
    // so opening the shard after a crash loads that state instead of walking every page of the
    // file to rebuild it. Only checkpoints are durable commits in commit-log mode, so a crash
    // always finds one of these as the shard's last durable commit (per-shard mode's commits
    // do without: each is a sync of its own, and the second phase would double them).
    txn.set_quick_repair(true);
    {
        let mut state = txn.open_table(STATE).ctx("opening table state")?;
        for id in unsaved.iter() {
            if let Some(row) = rows.get(id) {
                state
                    .insert(*id, row.encode().as_slice())
                    .ctx("writing a state row")?;
            }
        }
        let mut mark = txn.open_table(CHECKPOINT).ctx("opening table checkpoint")?;
        mark.insert(LAST_RECORD, lsn)
            .ctx("writing the checkpoint")?;
        mark.insert(REPLAY_FROM, replay_from)
            .ctx("writing the checkpoint")?;
    }
    txn.commit().ctx("committing a checkpoint")?;
    unsaved.clear();
    Ok(())
}

/// Applies replayed operations in one transaction committed without a sync (the caller
/// checkpoints at the end). They all succeeded once; one that fails now means the log and the
/// shard disagree.
pub(super) fn replay(
    db: &Database,
    rows: &mut HashMap<StreamId, StateRow>,
    unsaved: &mut HashSet<StreamId>,
    ops: Vec<(Op, Option<LogAt>)>,
    ref_min: usize,
) -> Result<(), StorageError> {
    let batch: Vec<Pending> = ops
        .into_iter()
        .map(|(op, at)| Pending {
            op,
            cache: None,
            done: None,
            at,
        })
        .collect();
    let stats = WriterStats::default();
    for result in commit(db, rows, &batch, &stats, Some(unsaved), ref_min)? {
        result?;
    }
    Ok(())
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
    match commit(db, rows, batch, stats, None, usize::MAX) {
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
                .map(
                    |p| match commit(db, rows, std::slice::from_ref(p), stats, None, usize::MAX) {
                        Ok(mut r) => r.pop().unwrap_or(Ok(())),
                        Err(e) => {
                            rows.clear();
                            Err(e)
                        }
                    },
                )
                .collect()
        }
    }
}

/// One transaction. With `unsaved` (commit-log mode) it commits without a sync and leaves the
/// state rows to the next checkpoint, noting which changed; without, it writes them and syncs.
/// Records of `ref_min` bytes or more whose operation says where the log holds them are
/// referenced, not copied.
pub(super) fn commit(
    db: &Database,
    rows: &mut HashMap<StreamId, StateRow>,
    batch: &[Pending],
    stats: &WriterStats,
    unsaved: Option<&mut HashSet<StreamId>>,
    ref_min: usize,
) -> Result<Vec<OpResult>, StorageError> {
    let mut txn = db.begin_write().ctx("beginning a write transaction")?;
    // Touches alone need no sync: they are a best-effort hint and the next durable commit
    // carries them to disk.
    let durability = if unsaved.is_some() || batch.iter().all(|p| matches!(p.op, Op::Touch { .. }))
    {
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
    let results = apply(&txn, rows, batch, unsaved, ref_min, stats)?;
    let applied = std::time::Instant::now();
    txn.commit().ctx("committing a write transaction")?;
    if matches!(durability, Durability::Immediate) {
        crate::metrics::storage_sync(applied.elapsed());
    }
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
    unsaved: Option<&mut HashSet<StreamId>>,
    ref_min: usize,
    stats: &WriterStats,
) -> Result<Vec<OpResult>, StorageError> {
    let mut t = Tables {
        streams: txn.open_table(STREAMS).ctx("opening table streams")?,
        state: txn.open_table(STATE).ctx("opening table state")?,
        producers: txn.open_table(PRODUCERS).ctx("opening table producers")?,
        producer_used: txn
            .open_table(PRODUCER_USED)
            .ctx("opening table producer_used")?,
        records: txn.open_table(RECORDS).ctx("opening table records")?,
    };
    // Streams whose state row changed; each row is written once per transaction however many
    // appends the stream had in it.
    let mut dirty: Vec<StreamId> = Vec::new();
    let mut open = OpenRows {
        rows: HashMap::new(),
        ref_min,
        events: Vec::new(),
    };
    let mut results = Vec::with_capacity(batch.len());
    for pending in batch {
        results.push(apply_one(
            &mut t,
            rows,
            &pending.op,
            pending.at,
            &mut dirty,
            &mut open,
        )?);
    }
    let events = open.write_all(&mut t.records)?;
    let freed = super::segments::account(txn, &events)?;
    if freed > 0 {
        stats.freed_ref_bytes.fetch_add(freed, Ordering::Relaxed);
    }
    if let Some(unsaved) = unsaved {
        unsaved.extend(dirty);
        return Ok(results);
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

/// The records a transaction adds, gathered per stream into rows of the `records` table: one
/// row holds a run of consecutive records (as many as fit a [`codec::ROW_PAGE_BYTES`] redb page,
/// at most [`codec::ROW_RECORDS`]; a record larger than a row is split across rows), so a transaction with many appends to a stream inserts one row for
/// them rather than one each. redb's cost is mostly per row inserted (each insert copies the
/// leaf it lands in), so this is what makes a transaction's cost follow the number of streams
/// it touches rather than the number of appends.
struct OpenRows<'b> {
    rows: HashMap<StreamId, OpenRow<'b>>,
    /// Records this long or longer are referenced when the log holds them.
    ref_min: usize,
    /// Reference rows written and deleted, in order ([`super::segments::account`]).
    events: Vec<super::segments::Event>,
}

struct OpenRow<'b> {
    start: u64,
    bytes: usize,
    records: Vec<&'b [u8]>,
    joins: codec::Joins,
    /// A reference row's segment and references (then `records` is empty).
    segment: Option<u64>,
    refs: Vec<(u64, u32)>,
}

impl OpenRow<'_> {
    /// Empties the row (just written) for the entries from `start` on; `continues` when the first
    /// goes on with the last entry of the row just written.
    fn restart(&mut self, start: u64, continues: bool) {
        self.start = start;
        self.bytes = 0;
        self.records.clear();
        self.refs.clear();
        self.segment = None;
        self.joins = codec::Joins {
            first_continues: continues,
            last_continues: false,
        };
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.refs.is_empty()
    }
}

impl<'b> OpenRows<'b> {
    /// Adds a non-empty record of `id` starting at `start` (the end of the stream's previous
    /// record, which the caller's admission check guarantees); `at` is where the commit log
    /// holds its bytes, if it does.
    fn add(
        &mut self,
        table: &mut Table<'_, (u64, u64), &'static [u8]>,
        id: StreamId,
        start: u64,
        data: &'b [u8],
        at: Option<LogAt>,
    ) -> Result<(), StorageError> {
        let row = self.rows.entry(id).or_insert_with(|| OpenRow {
            start,
            bytes: 0,
            records: Vec::new(),
            joins: codec::Joins::default(),
            segment: None,
            refs: Vec::new(),
        });
        let events = &mut self.events;
        debug_assert_eq!(row.start + row.bytes as u64, start);
        if let Some(at) = at.filter(|_| data.len() >= self.ref_min) {
            // A reference row points into one segment and holds whole records only.
            let other = row.segment != Some(at.segment) || row.refs.len() >= codec::ROW_RECORDS;
            if !row.is_empty() && other {
                put_row(table, id, row, events)?;
                row.restart(start, false);
            }
            row.segment = Some(at.segment);
            row.refs.push((at.offset, data.len() as u32));
            row.bytes += data.len();
            return Ok(());
        }
        if !row.refs.is_empty() {
            put_row(table, id, row, events)?;
            row.restart(start, false);
        }
        let (mut data, mut start) = (data, start);
        // A record larger than a row of its own could hold fills what room the open row has,
        // then as many rows as it needs; all of them are written in this transaction. Smaller
        // records are never split.
        if !codec::row_fits_page(1, data.len()) {
            loop {
                let room = if row.records.len() >= codec::ROW_RECORDS {
                    0
                } else {
                    codec::row_room(row.records.len(), row.bytes)
                };
                if data.len() <= room {
                    break;
                }
                let piece = room > 0;
                if piece {
                    row.records.push(&data[..room]);
                    row.bytes += room;
                    row.joins.last_continues = true;
                    data = &data[room..];
                    start += room as u64;
                }
                put_row(table, id, row, events)?;
                row.restart(start, piece);
            }
        }
        let full = !row.records.is_empty()
            && (!codec::row_fits_page(row.records.len() + 1, row.bytes + data.len())
                || row.records.len() >= codec::ROW_RECORDS);
        if full {
            put_row(table, id, row, events)?;
            row.restart(start, false);
        }
        row.bytes += data.len();
        row.records.push(data);
        Ok(())
    }

    /// Writes the open row of `id` now, if it has one.
    fn write_stream(
        &mut self,
        table: &mut Table<'_, (u64, u64), &'static [u8]>,
        id: StreamId,
    ) -> Result<(), StorageError> {
        if let Some(row) = self.rows.remove(&id) {
            put_row(table, id, &row, &mut self.events)?;
        }
        Ok(())
    }

    /// Forgets the unwritten records of a stream that is being removed.
    fn discard(&mut self, id: StreamId) {
        self.rows.remove(&id);
    }

    /// Writes every open row, in key order; returns what happened to reference rows.
    fn write_all(
        mut self,
        table: &mut Table<'_, (u64, u64), &'static [u8]>,
    ) -> Result<Vec<super::segments::Event>, StorageError> {
        let mut rows: Vec<_> = self.rows.into_iter().collect();
        rows.sort_unstable_by_key(|(id, _)| *id);
        for (id, row) in &rows {
            put_row(table, *id, row, &mut self.events)?;
        }
        Ok(self.events)
    }
}

fn put_row(
    table: &mut Table<'_, (u64, u64), &'static [u8]>,
    id: StreamId,
    row: &OpenRow<'_>,
    events: &mut Vec<super::segments::Event>,
) -> Result<(), StorageError> {
    if let Some(segment) = row.segment {
        let mut slot = table
            .insert_reserve((id, row.start), codec::ref_row_value_len(row.refs.len()))
            .ctx("writing a record row")?;
        codec::write_ref_row(slot.as_mut(), id, row.start, segment, &row.refs);
        events.push(super::segments::Event {
            segment,
            id,
            start: row.start,
            bytes: row.bytes as u64,
            added: true,
        });
        return Ok(());
    }
    let mut slot = table
        .insert_reserve((id, row.start), codec::row_value_len(&row.records))
        .ctx("writing a record row")?;
    codec::write_row(slot.as_mut(), id, row.start, &row.records, row.joins);
    Ok(())
}

/// The cached state row of `id`, loaded with `load` on first use.
fn row_of<'r>(
    rows: &'r mut HashMap<StreamId, StateRow>,
    load: &mut dyn FnMut(StreamId) -> Result<Option<StateRow>, StorageError>,
    id: StreamId,
) -> Result<Option<&'r mut StateRow>, StorageError> {
    match rows.entry(id) {
        Entry::Occupied(cached) => Ok(Some(cached.into_mut())),
        Entry::Vacant(slot) => Ok(load(id)?.map(|row| slot.insert(row))),
    }
}

/// Reads `id`'s state row from `state`.
fn load_row(
    state: &Table<'_, u64, &'static [u8]>,
    id: StreamId,
) -> Result<Option<StateRow>, StorageError> {
    match state.get(id).ctx("reading a state row")? {
        Some(raw) => Ok(Some(StateRow::decode(id, raw.value())?)),
        None => Ok(None),
    }
}

/// Checks `op` against its stream's state row and, if it is admitted, changes the row as
/// committing it will (the stream layer decided the protocol; this only refuses what would
/// corrupt the store). `load` fetches a row not yet in `rows`. An `Err` inside `Ok` rejects the
/// operation and changed nothing.
pub(super) fn admit(
    rows: &mut HashMap<StreamId, StateRow>,
    load: &mut dyn FnMut(StreamId) -> Result<Option<StateRow>, StorageError>,
    op: &Op,
) -> Result<OpResult, StorageError> {
    match op {
        Op::Create {
            id,
            start,
            initial,
            close,
            created_at_ms,
            ..
        } => {
            let id = *id;
            if row_of(rows, load, id)?.is_some() {
                return Ok(Err(StorageError::Corrupt {
                    what: format!("stream {id}"),
                    detail: "created twice".into(),
                }));
            }
            let own: u64 = initial.iter().map(|d| d.len() as u64).sum();
            rows.insert(
                id,
                StateRow {
                    tail: start + own,
                    released: *start,
                    last_access_ms: *created_at_ms,
                    lsn: 0,
                    closed: close.is_some(),
                    soft_deleted: false,
                    closed_by: close.clone().flatten().map(Box::new),
                    last_seq: None,
                },
            );
        }
        Op::Append { id, entry } => {
            let id = *id;
            let Some(row) = row_of(rows, load, id)? else {
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
            if row.closed {
                return Ok(Err(StorageError::Corrupt {
                    what: format!("append to stream {id}"),
                    detail: "the stream is closed".into(),
                }));
            }
            if let Some(data) = entry.data.as_ref() {
                row.tail += data.len() as u64;
            }
            if let Some(seq) = &entry.stream_seq {
                row.last_seq = Some(seq.as_str().into());
            }
            if let Some(by) = &entry.close {
                row.closed = true;
                row.closed_by = by.clone().map(Box::new);
            }
        }
        Op::SoftDelete { id } => {
            let Some(row) = row_of(rows, load, *id)? else {
                return Ok(Err(StorageError::Removed(*id)));
            };
            row.soft_deleted = true;
        }
        Op::Release { id, before } => {
            let Some(row) = row_of(rows, load, *id)? else {
                return Ok(Err(StorageError::Removed(*id)));
            };
            if *before > row.tail {
                return Ok(Err(StorageError::Corrupt {
                    what: format!("release of stream {id}"),
                    detail: format!("release before {before} is past the tail {}", row.tail),
                }));
            }
            if *before > row.released {
                row.released = *before;
            }
        }
        Op::Touch { id, at_ms } => {
            if let Some(row) = row_of(rows, load, *id)? {
                row.last_access_ms = row.last_access_ms.max(*at_ms);
            }
        }
        Op::Remove { id } => {
            rows.remove(id);
        }
    }
    Ok(Ok(()))
}

fn apply_one<'b>(
    t: &mut Tables<'_>,
    rows: &mut HashMap<StreamId, StateRow>,
    op: &'b Op,
    at: Option<LogAt>,
    dirty: &mut Vec<StreamId>,
    open: &mut OpenRows<'b>,
) -> Result<OpResult, StorageError> {
    let admitted = {
        let state = &t.state;
        admit(rows, &mut |id| load_row(state, id), op)?
    };
    if admitted.is_err() {
        return Ok(admitted);
    }
    match op {
        Op::Create {
            id,
            meta,
            start,
            initial,
            ..
        } => {
            let id = *id;
            t.streams
                .insert(id, meta.as_slice())
                .ctx("writing stream metadata")?;
            let mut pos = *start;
            // Initial records follow each other in the log, each behind its 4-byte length.
            let mut at = at;
            for data in initial {
                if !data.is_empty() {
                    open.add(&mut t.records, id, pos, data, at)?;
                    pos += data.len() as u64;
                }
                if let Some(at) = at.as_mut() {
                    at.offset += data.len() as u64 + 4;
                }
            }
            dirty.push(id);
        }
        Op::Append { id, entry } => {
            if let Some(data) = entry.data.as_ref().filter(|d| !d.is_empty()) {
                open.add(&mut t.records, *id, entry.start, data, at)?;
            }
            if let Some((producer, ps)) = &entry.producer {
                t.producers
                    .insert((*id, producer.as_str()), (ps.epoch, ps.last_seq))
                    .ctx("writing producer state")?;
                if ps.last_ms != 0 {
                    t.producer_used
                        .insert((*id, producer.as_str()), ps.last_ms)
                        .ctx("writing producer state")?;
                }
            }
            dirty.push(*id);
        }
        Op::SoftDelete { id } => dirty.push(*id),
        Op::Release { id, before } => {
            let (id, before) = (*id, *before);
            // Records of this transaction may be among those released: their row goes in first.
            open.write_stream(&mut t.records, id)?;
            // Rows that end by `before` are deleted; a row holding `before` inside it stays
            // whole (rows are never rewritten) until a later release passes its end. `before` is
            // a record boundary, so the pieces of a split record go together or the row left
            // first starts with the rest of one whose earlier pieces went (readers skip it).
            let events = &mut open.events;
            t.records
                .retain_in((id, 0)..(id, before), |key, value| {
                    let Ok(row) = codec::parse_row(id, key.1, value) else {
                        return true;
                    };
                    let keep = key.1 + row.data_len() > before;
                    if !keep {
                        events.extend(super::segments::deleted(id, key.1, &row));
                    }
                    keep
                })
                .ctx("deleting released records")?;
            dirty.push(id);
        }
        Op::Touch { id, .. } => {
            if rows.contains_key(id) {
                dirty.push(*id);
            }
        }
        Op::Remove { id } => {
            let id = *id;
            open.discard(id);
            let events = &mut open.events;
            t.records
                .retain_in((id, 0)..=(id, u64::MAX), |key, value| {
                    if let Ok(row) = codec::parse_row(id, key.1, value) {
                        events.extend(super::segments::deleted(id, key.1, &row));
                    }
                    false
                })
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
                t.producer_used
                    .remove((id, producer.as_str()))
                    .ctx("removing producer state")?;
            }
            t.state.remove(id).ctx("removing a state row")?;
            t.streams.remove(id).ctx("removing stream metadata")?;
        }
    }
    Ok(Ok(()))
}
