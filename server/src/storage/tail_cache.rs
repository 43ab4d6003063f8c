//! The newest records of each stream, kept in RAM so that live readers (who read at the tail)
//! are served without a disk read or a blocking-thread round trip. Shared by the durable
//! backends (`file`, `acid`); `memory` holds everything in RAM anyway.
//!
//! A stream's cache is always a contiguous run of its newest committed records: a record that
//! does not continue the run, or that the budget refuses, empties it (so it never has holes), and
//! the oldest records are dropped once the stream's cache passes [`STREAM_CACHE_BYTES`]. Backends
//! push a record only once it is committed, so a read served from here never sees more than a
//! read from disk would.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::{ReadChunk, StorageError, plan_read};

/// Newest bytes of each stream kept in RAM for live readers.
pub(crate) const STREAM_CACHE_BYTES: usize = 1 << 20;

/// RAM shared by the caches of all streams (`DS_LIMITS__MAX_MEMORY_BYTES` in durable modes).
#[derive(Debug)]
pub(crate) struct CacheBudget {
    used: AtomicUsize,
    limit: usize,
}

impl CacheBudget {
    pub fn new(limit: usize) -> Self {
        CacheBudget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    fn take(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + n > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(u) => used = u,
            }
        }
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes held by all caches together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// `(used, limit)` in bytes, for metrics.
    pub fn usage(&self) -> (u64, u64) {
        (self.used() as u64, self.limit as u64)
    }
}

/// One stream's newest records.
#[derive(Debug, Default)]
pub(crate) struct TailCache {
    /// `(start position, data)`, oldest first; each record starts where the previous one ends.
    records: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl TailCache {
    /// Cached records.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Position of the first cached byte and of the byte after the last, if anything is cached.
    pub fn span(&self) -> Option<(u64, u64)> {
        let (first, _) = self.records.front()?;
        let (last, data) = self.records.back()?;
        Some((*first, last + data.len() as u64))
    }

    /// Notes a committed record at `start`. Its bytes are kept when given, when they continue
    /// the cached run and when both budgets allow; otherwise the cache is emptied, so that it
    /// stays a suffix of the stream's records (the file backend relies on that: the cache holds
    /// every record from its first on).
    pub fn push(&mut self, start: u64, data: Option<Bytes>, budget: &CacheBudget) {
        let continues = self.span().is_none_or(|(_, end)| end == start);
        let data = data.filter(|d| continues && d.len() <= STREAM_CACHE_BYTES);
        let Some(data) = data else {
            self.clear(budget);
            return;
        };
        // Room within the stream's own limit first, so that a stream at its limit keeps its
        // newest records even when the shared budget is spent.
        while self.bytes + data.len() > STREAM_CACHE_BYTES {
            let Some((_, old)) = self.records.pop_front() else {
                break;
            };
            self.bytes -= old.len();
            budget.give(old.len());
        }
        if budget.take(data.len()) {
            self.bytes += data.len();
            self.records.push_back((start, data));
        } else {
            self.clear(budget);
        }
    }

    /// Copies of the cached records that start in `[from, until)` (shared bytes, no copy of data).
    pub fn run(&self, from: u64, until: u64) -> Vec<(u64, Bytes)> {
        let at = self.records.partition_point(|(start, _)| *start < from);
        self.records
            .range(at..)
            .take_while(|(start, _)| *start < until)
            .cloned()
            .collect()
    }

    /// Drops the cached records that end at or before `pos` (released data), returning their
    /// bytes to the budget. What stays is still a suffix of the stream's records.
    pub fn drop_before(&mut self, pos: u64, budget: &CacheBudget) {
        while let Some((start, data)) = self.records.front() {
            if start + data.len() as u64 > pos {
                break;
            }
            self.bytes -= data.len();
            budget.give(data.len());
            self.records.pop_front();
        }
    }

    /// Drops everything cached, returning its bytes to the budget.
    pub fn clear(&mut self, budget: &CacheBudget) {
        budget.give(self.bytes);
        self.records.clear();
        self.bytes = 0;
    }

    /// Reads `[from, until)` (see the storage contract) from the cache alone, or `None` when the
    /// cache does not hold that whole range.
    pub fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> Option<Result<ReadChunk, StorageError>> {
        read_run(&self.records, from, until, max_bytes, split)
    }
}

/// Serves `[from, until)` from a contiguous run of records (oldest first, each starting where
/// the previous one ends), with the read rules of [`plan_read`]; `None` unless the run holds the
/// whole range.
pub(crate) fn read_run(
    records: &VecDeque<(u64, Bytes)>,
    from: u64,
    until: u64,
    max_bytes: usize,
    split: bool,
) -> Option<Result<ReadChunk, StorageError>> {
    let (first, _) = records.front()?;
    let (last, data) = records.back()?;
    let (first, end) = (*first, last + data.len() as u64);
    if from < first || until > end {
        return None;
    }
    let span = |i: usize| {
        let (start, data) = &records[i];
        (*start, data.len() as u64)
    };
    let planned = plan_read(records.len(), span, first, from, until, max_bytes, split);
    Some(planned.map(|(pieces, end)| {
        ReadChunk {
            parts: pieces
                .iter()
                .map(|p| records[p.record].1.slice(p.skip..p.skip + p.len))
                .collect(),
            end,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn joined(chunk: &ReadChunk) -> String {
        chunk
            .parts
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let budget = CacheBudget::new(1 << 20);
        let mut cache = TailCache::default();
        assert!(cache.read(0, 1, 10, true).is_none());
        cache.push(10, bytes("abc"), &budget);
        cache.push(13, bytes("de"), &budget);
        assert_eq!(cache.span(), Some((10, 15)));
        let c = cache.read(10, 15, 100, false).unwrap().unwrap();
        assert_eq!((joined(&c).as_str(), c.end), ("abcde", 15));
        let c = cache.read(11, 15, 2, true).unwrap().unwrap();
        assert_eq!((joined(&c).as_str(), c.end), ("bc", 13));
        assert!(matches!(
            cache.read(11, 15, 100, false),
            Some(Err(StorageError::Misaligned { pos: 11 }))
        ));
        // Before the cached run, or past its end: not here.
        assert!(cache.read(9, 15, 100, true).is_none());
        assert!(cache.read(13, 16, 100, true).is_none());
        assert_eq!(budget.used(), 5);
    }

    #[test]
    fn a_gap_or_an_uncached_record_empties_it() {
        let budget = CacheBudget::new(1 << 20);
        let mut cache = TailCache::default();
        cache.push(0, bytes("ab"), &budget);
        // A record that does not continue the run: the cache restarts empty.
        cache.push(5, bytes("xy"), &budget);
        assert_eq!((cache.len(), budget.used()), (0, 0));
        cache.push(7, bytes("z"), &budget);
        assert_eq!(cache.span(), Some((7, 8)));
        // A record whose bytes are not given (too large for the caller to keep).
        cache.push(8, None, &budget);
        assert_eq!((cache.len(), budget.used()), (0, 0));
        cache.push(20, bytes("q"), &budget);
        cache.push(21, bytes("r"), &budget);
        assert_eq!((cache.span(), cache.len()), (Some((20, 22)), 2));
    }

    #[test]
    fn budgets_bound_each_stream_and_all_together() {
        let budget = CacheBudget::new(STREAM_CACHE_BYTES + 10);
        let mut a = TailCache::default();
        let half = Bytes::from(vec![b'a'; STREAM_CACHE_BYTES / 2]);
        a.push(0, Some(half.clone()), &budget);
        a.push(half.len() as u64, Some(half.clone()), &budget);
        a.push(2 * half.len() as u64, Some(half.clone()), &budget);
        // The oldest record went to keep the stream within its own limit.
        assert_eq!(a.len(), 2);
        assert_eq!(budget.used(), STREAM_CACHE_BYTES);
        // Another stream finds the shared budget nearly spent: its record is not cached.
        let mut b = TailCache::default();
        b.push(0, bytes("0123456789abc"), &budget);
        assert_eq!(b.len(), 0);
        b.push(0, bytes("0123456789"), &budget);
        assert_eq!(b.len(), 1);
        a.clear(&budget);
        assert_eq!(budget.used(), 10);
    }
}
