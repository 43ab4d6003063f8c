//! `memory`: streams live in RAM and are lost on restart. Acknowledged means stored in RAM.
//!
//! Each log is a vector of records behind its own lock; no lock is shared across streams. Reads
//! clone `Bytes` handles (reference counts), never the payloads.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;

use super::{
    AppendEntry, Commit, ProducerTuple, ReadChunk, Recovered, StorageError, StreamLog, StreamMeta,
    done, plan_read,
};

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryStorage;

impl super::Storage for MemoryStorage {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn create(
        &self,
        meta: &StreamMeta,
        initial: Vec<Bytes>,
        _close: Option<Option<ProducerTuple>>,
    ) -> Result<(Arc<dyn StreamLog>, Commit), StorageError> {
        let start = meta.fork.as_ref().map_or(0, |f| f.offset);
        let log = MemoryLog::new(start);
        {
            let mut log_records = log.records.write();
            let records = &mut log_records.records;
            let mut end = start;
            for data in initial.into_iter().filter(|d| !d.is_empty()) {
                end += data.len() as u64;
                records.push(Record { end, data });
            }
        }
        Ok((Arc::new(log), done()))
    }

    fn recover(&self) -> Result<Vec<Recovered>, StorageError> {
        Ok(Vec::new())
    }
}

#[derive(Debug)]
struct Record {
    /// Position just past this record.
    end: u64,
    data: Bytes,
}

/// One stream's records, ordered by position.
#[derive(Debug)]
pub struct MemoryLog {
    records: RwLock<Records>,
}

#[derive(Debug)]
struct Records {
    /// Position of the first record held: the fork anchor for forks, else 0, until a release
    /// moves it forward.
    start: u64,
    /// Whether `start` moved by a release (reads below it are `Released`, not misaligned).
    released: bool,
    records: Vec<Record>,
}

impl MemoryLog {
    fn new(start: u64) -> Self {
        MemoryLog {
            records: RwLock::new(Records {
                start,
                released: false,
                records: Vec::new(),
            }),
        }
    }

    fn read_now(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> Result<ReadChunk, StorageError> {
        let log = self.records.read();
        if log.released && from < log.start && from < until {
            return Err(StorageError::Released { start: log.start });
        }
        read_records(&log.records, log.start, from, until, max_bytes, split)
    }
}

/// Reads `[from, until)` out of `records` (shared by the memory log and tests).
fn read_records(
    records: &[Record],
    log_start: u64,
    from: u64,
    until: u64,
    max_bytes: usize,
    split: bool,
) -> Result<ReadChunk, StorageError> {
    let span = |i: usize| {
        let r = &records[i];
        (r.end - r.data.len() as u64, r.data.len() as u64)
    };
    let (pieces, end) = plan_read(
        records.len(),
        span,
        log_start,
        from,
        until,
        max_bytes,
        split,
    )?;
    Ok(ReadChunk {
        parts: pieces
            .iter()
            .map(|p| records[p.record].data.slice(p.skip..p.skip + p.len))
            .collect(),
        end,
    })
}

impl StreamLog for MemoryLog {
    fn append(&self, entry: AppendEntry) -> Commit {
        if let Some(data) = entry.data.filter(|d| !d.is_empty()) {
            let end = entry.start + data.len() as u64;
            self.records.write().records.push(Record { end, data });
        }
        done()
    }

    fn mark_soft_deleted(&self) -> Commit {
        done()
    }

    fn remove(&self) -> Commit {
        // Readers holding `Bytes` keep their pieces alive; the vector goes now.
        self.records.write().records.clear();
        done()
    }

    /// Drops the records that end at or before `before`: the stream layer passes a record
    /// boundary, so no record straddles it. The bytes go at once (readers holding `Bytes` of
    /// them keep just those pieces alive).
    fn release(&self, before: u64) -> Commit {
        let mut log = self.records.write();
        if before <= log.start {
            return done();
        }
        let n = log.records.partition_point(|r| r.end <= before);
        log.records.drain(..n);
        log.start = before;
        log.released = true;
        done()
    }

    fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> BoxFuture<'static, Result<ReadChunk, StorageError>> {
        Box::pin(std::future::ready(
            self.read_now(from, until, max_bytes, split),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(parts: &[&'static str]) -> Vec<Record> {
        let mut end = 0;
        parts
            .iter()
            .map(|p| {
                end += p.len() as u64;
                Record {
                    end,
                    data: Bytes::from_static(p.as_bytes()),
                }
            })
            .collect()
    }

    fn joined(chunk: &ReadChunk) -> String {
        chunk
            .parts
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    #[test]
    fn reads_whole_records_until_budget() {
        let r = recs(&["abc", "de", "fghi"]);
        let c = read_records(&r, 0, 0, 9, 4, false).unwrap();
        assert_eq!(joined(&c), "abc");
        assert_eq!(c.end, 3);
        let c = read_records(&r, 0, 3, 9, 100, false).unwrap();
        assert_eq!(joined(&c), "defghi");
        assert_eq!(c.end, 9);
    }

    #[test]
    fn always_returns_one_record_even_over_budget() {
        let r = recs(&["abcdef"]);
        let c = read_records(&r, 0, 0, 6, 2, false).unwrap();
        assert_eq!(joined(&c), "abcdef");
    }

    #[test]
    fn split_reads_cut_inside_records_and_respect_until() {
        let r = recs(&["abc", "def"]);
        let c = read_records(&r, 0, 1, 5, 100, true).unwrap();
        assert_eq!(joined(&c), "bcde");
        assert_eq!(c.end, 5);
        let c = read_records(&r, 0, 0, 6, 4, true).unwrap();
        assert_eq!(joined(&c), "abcd");
        assert_eq!(c.end, 4);
    }

    #[test]
    fn unsplittable_read_from_inside_a_record_is_misaligned() {
        let r = recs(&["abc", "def"]);
        assert!(matches!(
            read_records(&r, 0, 1, 6, 100, false),
            Err(StorageError::Misaligned { pos: 1 })
        ));
    }

    #[test]
    fn released_records_are_gone_and_reads_below_say_where_data_starts() {
        let log = MemoryLog::new(0);
        let mut start = 0;
        for part in ["abc", "de", "fghi"] {
            let data = Bytes::from_static(part.as_bytes());
            let len = data.len() as u64;
            drop(log.append(AppendEntry {
                start,
                data: Some(data),
                ..AppendEntry::default()
            }));
            start += len;
        }
        drop(log.release(5));
        assert_eq!(log.records.read().records.len(), 1);
        assert!(matches!(
            log.read_now(0, 9, 100, false),
            Err(StorageError::Released { start: 5 })
        ));
        let c = log.read_now(5, 9, 100, false).unwrap();
        assert_eq!(joined(&c), "fghi");
        // Releasing at or below the retained start changes nothing.
        drop(log.release(3));
        assert_eq!(log.read_now(5, 9, 100, false).unwrap().end, 9);
    }

    #[test]
    fn empty_range_reads_nothing() {
        let r = recs(&["abc"]);
        let c = read_records(&r, 0, 3, 3, 100, false).unwrap();
        assert!(c.parts.is_empty());
        assert_eq!(c.end, 3);
    }
}
