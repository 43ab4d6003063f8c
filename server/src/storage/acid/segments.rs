//! Records kept in the commit log (layout version 4): a record of [`super::writer::REF_MIN_BYTES`]
//! or more is not copied into redb; its `records` row references its bytes in the commit log
//! segment the engine wrote and synced it to. The log is the value store: reads map its
//! segments (as the file modes map theirs), and the flusher writes 12 bytes per record rather
//! than the record.
//!
//! Which segments are still needed is kept in two tables per shard, changed in the same
//! transaction as the rows: `segment_rows` (segment, stream, row start) lists the reference rows
//! into each segment, and `segment_live` (segment) → the bytes those rows reference. A segment
//! the engine has closed and every shard has checkpointed past is deleted once no shard has a
//! `segment_live` entry for it as of a durable checkpoint (so no row a crash could bring back
//! references it). A closed segment whose referenced bytes fall under half its size is
//! compacted: its reference rows are rewritten as rows holding the records' bytes ([`compact`]),
//! after which it is deleted as above. Disk is then bounded by the live data plus, per segment,
//! at most as much again, plus the segments not yet checkpointed.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};

use super::commit_log;
use super::{DbResult, RECORDS, SEGMENT_LIVE, SEGMENT_ROWS, codec};
use crate::storage::mapped;
use crate::storage::{StorageError, StreamId};

/// A reference row written (`added`) or deleted.
#[derive(Clone, Copy, Debug)]
pub(super) struct Event {
    pub segment: u64,
    pub id: StreamId,
    pub start: u64,
    pub bytes: u64,
    pub added: bool,
}

/// The event of deleting the row of `id` at `start`, if it references the log.
pub(super) fn deleted(id: StreamId, start: u64, row: &codec::Row<'_>) -> Option<Event> {
    row.segment().map(|segment| Event {
        segment,
        id,
        start,
        bytes: row.data_len(),
        added: false,
    })
}

/// Applies `events` (in order) to the segment tables of the transaction. Returns the bytes no
/// longer referenced.
pub(super) fn account(txn: &WriteTransaction, events: &[Event]) -> Result<u64, StorageError> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut rows = txn
        .open_table(SEGMENT_ROWS)
        .ctx("opening table segment_rows")?;
    let mut deltas: BTreeMap<u64, i128> = BTreeMap::new();
    let mut freed = 0;
    for e in events {
        if e.added {
            rows.insert((e.segment, e.id, e.start), ())
                .ctx("writing segment_rows")?;
            *deltas.entry(e.segment).or_default() += i128::from(e.bytes);
        } else {
            rows.remove((e.segment, e.id, e.start))
                .ctx("writing segment_rows")?;
            *deltas.entry(e.segment).or_default() -= i128::from(e.bytes);
            freed += e.bytes;
        }
    }
    let mut live = txn
        .open_table(SEGMENT_LIVE)
        .ctx("opening table segment_live")?;
    for (segment, delta) in deltas {
        let had = live
            .get(segment)
            .ctx("reading segment_live")?
            .map_or(0, |v| v.value());
        let now = i128::from(had) + delta;
        let now = u64::try_from(now).map_err(|_| StorageError::Corrupt {
            what: format!("segment_live of commit log segment {segment}"),
            detail: format!("{had} bytes referenced, {delta} changed"),
        })?;
        if now == 0 {
            live.remove(segment).ctx("writing segment_live")?;
        } else {
            live.insert(segment, now).ctx("writing segment_live")?;
        }
    }
    Ok(freed)
}

/// Every segment the rows of `db` reference, with the bytes they reference in it.
pub(super) fn live(db: &Database) -> Result<Vec<(u64, u64)>, StorageError> {
    let txn = db.begin_read().ctx("reading segment_live")?;
    let table = txn.open_table(SEGMENT_LIVE).ctx("reading segment_live")?;
    let mut out = Vec::new();
    for item in table.iter().ctx("reading segment_live")? {
        let (k, v) = item.ctx("reading segment_live")?;
        out.push((k.value(), v.value()));
    }
    Ok(out)
}

/// The bytes each segment has referenced, over all shards.
pub(super) fn live_all(dbs: &[Arc<Database>]) -> Result<BTreeMap<u64, u64>, StorageError> {
    let mut total = BTreeMap::new();
    for db in dbs {
        for (segment, bytes) in live(db)? {
            *total.entry(segment).or_default() += bytes;
        }
    }
    Ok(total)
}

/// The commit log's segments as reads see them: opened (and mapped) on first use, a bounded
/// number at a time.
pub(crate) struct LogSegments {
    dir: PathBuf,
    open: Mutex<mapped::Open>,
    map_reads: bool,
    /// The active segment grows to about this size: mapped this long, it is mapped once.
    segment_bytes: u64,
}

impl LogSegments {
    pub(super) fn new(
        dir: &Path,
        map_reads: bool,
        max_open: usize,
        segment_bytes: u64,
    ) -> LogSegments {
        LogSegments {
            dir: dir.to_owned(),
            open: Mutex::new(mapped::Open::new(max_open.max(1))),
            map_reads,
            segment_bytes,
        }
    }

    fn segment(&self, segment: u64) -> Result<Arc<mapped::Segment>, StorageError> {
        let mut open = self.open.lock();
        if let Some(f) = open.get(segment) {
            return Ok(f);
        }
        let path = commit_log::segment_path(&self.dir, segment);
        let f = Arc::new(mapped::Segment::new(File::open(&path).map_err(
            |source| StorageError::Io {
                what: format!("opening {}", path.display()),
                source,
            },
        )?));
        open.insert(segment, f.clone());
        Ok(f)
    }

    /// `len` bytes at `offset` of `segment` (blocking): the page cache's pages if reads are
    /// mapped, else a copy.
    pub(super) fn read(
        &self,
        segment: u64,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, StorageError> {
        self.read_via(&mut None, segment, offset, len)
    }

    /// [`Self::read`], keeping the last segment used in `last` so that a read of many records
    /// of one segment looks it up once.
    pub(super) fn read_via(
        &self,
        last: &mut Option<(u64, Arc<mapped::Segment>)>,
        segment: u64,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, StorageError> {
        let file = match last {
            Some((n, f)) if *n == segment => f.clone(),
            _ => {
                let f = self.segment(segment)?;
                *last = Some((segment, f.clone()));
                f
            }
        };
        let failed = |source| StorageError::Io {
            what: format!(
                "{} at {offset}",
                commit_log::segment_path(&self.dir, segment).display()
            ),
            source,
        };
        if self.map_reads {
            return file.mapped(offset, len, self.segment_bytes).map_err(failed);
        }
        let mut buf = vec![0u8; len];
        file.read_into(&mut buf, offset).map_err(failed)?;
        Ok(Bytes::from(buf))
    }

    /// Closes `segment` for reads (it is being deleted); reads under way keep what they have.
    pub(super) fn forget(&self, segment: u64) {
        self.open.lock().remove(segment);
    }
}

/// Whether `e` says that a segment a row referenced is gone (compacted and deleted since the
/// read transaction began): the read is then retried on a newer one.
pub(super) fn is_gone(e: &StorageError) -> bool {
    matches!(e, StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Rewrites the reference rows of `db` that point into `segment` as rows holding the records'
/// bytes, in one transaction committed without a sync (the next checkpoint makes it durable;
/// the segment is deleted only after that). Returns the bytes rewritten; stops once about
/// `budget` bytes are (call again for the rest).
pub(super) fn compact(
    db: &Database,
    segments: &LogSegments,
    segment: u64,
    budget: u64,
) -> Result<u64, StorageError> {
    let what = format!("compacting commit log segment {segment}");
    let mut txn = db.begin_write().ctx(&what)?;
    txn.set_durability(Durability::None)
        .map_err(|e| StorageError::Corrupt {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    let mut events = Vec::new();
    {
        let index = txn.open_table(SEGMENT_ROWS).ctx(&what)?;
        let mut records = txn.open_table(RECORDS).ctx(&what)?;
        let mut listed: Vec<(StreamId, u64)> = Vec::new();
        for item in index
            .range((segment, 0, 0)..=(segment, u64::MAX, u64::MAX))
            .ctx(&what)?
        {
            let (k, _) = item.ctx(&what)?;
            let (_, id, start) = k.value();
            listed.push((id, start));
        }
        drop(index);
        let mut moved = 0u64;
        for (id, start) in listed {
            if moved >= budget {
                break;
            }
            let entries: Vec<(u64, u32)> = {
                let Some(raw) = records.get((id, start)).ctx(&what)? else {
                    return Err(StorageError::Corrupt {
                        what,
                        detail: format!("segment_rows lists row ({id}, {start}), which is gone"),
                    });
                };
                let row = codec::read_row(id, start, raw.value())?;
                if row.segment() != Some(segment) {
                    return Err(StorageError::Corrupt {
                        what,
                        detail: format!("row ({id}, {start}) does not reference the segment"),
                    });
                }
                row.entries()
                    .filter_map(|e| match e {
                        codec::Entry::At { offset, len, .. } => Some((offset, len)),
                        codec::Entry::Inline(_) => None,
                    })
                    .collect()
            };
            let mut bytes = 0u64;
            // Rows of whole records, as many as fit a page each (a record larger than a page
            // gets a row of its own), the first under the reference row's key.
            let mut pos = start;
            let mut row_start = start;
            let mut held: Vec<Bytes> = Vec::new();
            let mut held_len = 0usize;
            for (offset, len) in entries {
                let data = segments.read(segment, offset, len as usize)?;
                if !held.is_empty() && !codec::row_fits_page(held.len() + 1, held_len + data.len())
                {
                    put_inline(&mut records, id, row_start, &held)?;
                    row_start = pos;
                    held.clear();
                    held_len = 0;
                }
                pos += data.len() as u64;
                bytes += data.len() as u64;
                held_len += data.len();
                held.push(data);
            }
            if !held.is_empty() {
                put_inline(&mut records, id, row_start, &held)?;
            }
            events.push(Event {
                segment,
                id,
                start,
                bytes,
                added: false,
            });
            moved += bytes;
        }
    }
    let freed = account(&txn, &events)?;
    txn.commit().ctx(&what)?;
    Ok(freed)
}

fn put_inline(
    records: &mut redb::Table<'_, (u64, u64), &'static [u8]>,
    id: StreamId,
    start: u64,
    held: &[Bytes],
) -> Result<(), StorageError> {
    let parts: Vec<&[u8]> = held.iter().map(|b| b.as_ref()).collect();
    let mut slot = records
        .insert_reserve((id, start), codec::row_value_len(&parts))
        .ctx("writing a compacted record row")?;
    codec::write_row(slot.as_mut(), id, start, &parts, codec::Joins::default());
    Ok(())
}

/// The segments worth compacting: closed (below `closed_below`), referenced, and referenced
/// for less than half their size. Oldest first.
pub(super) fn worth_compacting(
    dir: &Path,
    live: &BTreeMap<u64, u64>,
    closed_below: u64,
) -> Vec<u64> {
    live.iter()
        .filter(|&(&segment, _)| segment < closed_below)
        .filter(|&(&segment, &bytes)| {
            let size =
                std::fs::metadata(commit_log::segment_path(dir, segment)).map_or(0, |m| m.len());
            bytes.saturating_mul(2) < size
        })
        .map(|(&segment, _)| segment)
        .collect()
}
