//! `memory`: streams live in RAM and are lost on restart. Acknowledged means stored in RAM.
//!
//! Each log is its records behind its own lock; no lock is shared across streams. Small records
//! (at most [`SMALL_RECORD`] bytes) are packed into chunks of up to [`CHUNK_BYTES`], each
//! record's end kept as a `u16` offset inside its chunk, so that a stored 100-byte append costs
//! about 102 bytes of RAM rather than an allocation, a handle and an index entry of its own
//! (about 154 bytes at a million records, measured). Larger records are kept as buffers of
//! their own. The chunk being filled grows by size classes, so a stream with a few records
//! holds a few hundred bytes, not a whole chunk.
//!
//! Reads share sealed chunks and large records (reference counts, never copies of the payload);
//! only what is read from the chunk still being filled is copied (at most one chunk, usually
//! the few records a live reader has not seen), so the chunk can grow while readers hold what
//! they read. A byte-stream read returns one piece per chunk rather than one per record.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;

use super::{
    AppendEntry, Commit, ProducerTuple, ReadChunk, Recovered, StorageError, StreamLog, StreamMeta,
    done,
};

/// Records at most this large are packed into chunks; larger ones are kept as they are.
pub const SMALL_RECORD: usize = 2 << 10;

/// A chunk's largest size: jemalloc's largest small size class (14 KiB with 4 KiB pages), so a
/// full chunk loses nothing to rounding, and below `u16::MAX`, so offsets inside it fit a `u16`.
pub const CHUNK_BYTES: usize = 14 << 10;

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryStorage;

impl super::Storage for MemoryStorage {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn copies_appends(&self) -> bool {
        true
    }

    fn create(
        &self,
        meta: &Arc<StreamMeta>,
        initial: Vec<Bytes>,
        _close: Option<Option<ProducerTuple>>,
    ) -> Result<(Arc<dyn StreamLog>, Commit), StorageError> {
        let start = meta.fork().map_or(0, |f| f.offset);
        let log = MemoryLog::new(start);
        {
            let mut records = log.records.write();
            let mut end = start;
            for data in initial.iter().filter(|d| !d.is_empty()) {
                records.push(end, data);
                end += data.len() as u64;
            }
        }
        Ok((Arc::new(log), done()))
    }

    fn recover(&self) -> Result<Vec<Recovered>, StorageError> {
        Ok(Vec::new())
    }
}

/// `n` rounded up to a jemalloc size class (16-byte steps up to 128, then four classes per
/// doubling), so that a growing chunk asks for what it will be given anyway.
fn size_class(n: usize) -> usize {
    if n <= 128 {
        return n.div_ceil(16).max(1) * 16;
    }
    let step = n.next_power_of_two() / 8;
    n.div_ceil(step) * step
}

/// A chunk no longer written to: small records packed together, or one large record.
#[derive(Debug)]
struct Sealed {
    /// Position of the chunk's first byte.
    start: u64,
    data: Bytes,
    /// Ends of its records, relative to `start`; empty when `data` is one record.
    ends: Box<[u16]>,
}

/// The chunk being filled: it grows (and may be reallocated) while records arrive, so readers
/// get copies of what they read from it.
#[derive(Debug)]
struct Open {
    start: u64,
    buf: Vec<u8>,
    ends: Vec<u16>,
}

/// One chunk as a read sees it.
struct View<'a> {
    start: u64,
    bytes: &'a [u8],
    ends: &'a [u16],
}

impl View<'_> {
    fn records(&self) -> usize {
        self.ends.len().max(1)
    }

    fn record_start(&self, j: usize) -> usize {
        if j == 0 { 0 } else { self.ends[j - 1] as usize }
    }

    fn record_end(&self, j: usize) -> usize {
        if self.ends.is_empty() {
            self.bytes.len()
        } else {
            self.ends[j] as usize
        }
    }

    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// One stream's log.
#[derive(Debug)]
pub struct MemoryLog {
    records: RwLock<Records>,
}

/// One stream's records, ordered by position: the sealed chunks, then the open one.
#[derive(Debug)]
struct Records {
    /// Position of the first record held: the fork anchor for forks, else 0, until a release
    /// moves it forward. The first chunk starts here.
    start: u64,
    /// Whether `start` moved by a release (reads below it are `Released`, not misaligned).
    released: bool,
    sealed: VecDeque<Sealed>,
    /// Boxed: an empty stream's log stays small.
    open: Option<Box<Open>>,
}

impl Records {
    fn chunks(&self) -> usize {
        self.sealed.len() + usize::from(self.open.is_some())
    }

    fn view(&self, i: usize) -> View<'_> {
        match self.sealed.get(i) {
            Some(c) => View {
                start: c.start,
                bytes: &c.data,
                ends: &c.ends,
            },
            None => {
                let o = self.open.as_deref().expect("chunk index in range");
                View {
                    start: o.start,
                    bytes: &o.buf,
                    ends: &o.ends,
                }
            }
        }
    }

    /// Stores `data` (non-empty), which starts at `at`, the end of what is stored.
    fn push(&mut self, at: u64, data: &[u8]) {
        if data.len() > SMALL_RECORD {
            self.seal();
            self.sealed.push_back(Sealed {
                start: at,
                data: Bytes::copy_from_slice(data),
                ends: Box::default(),
            });
            return;
        }
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.buf.len() + data.len() > CHUNK_BYTES)
        {
            self.seal();
        }
        let open = self.open.get_or_insert_with(|| {
            Box::new(Open {
                start: at,
                buf: Vec::new(),
                ends: Vec::new(),
            })
        });
        debug_assert_eq!(open.start + open.buf.len() as u64, at);
        let need = open.buf.len() + data.len();
        if need > open.buf.capacity() {
            let grown = size_class((open.buf.capacity() * 3 / 2).max(need)).min(CHUNK_BYTES);
            open.buf.reserve_exact(grown - open.buf.len());
        }
        open.buf.extend_from_slice(data);
        open.ends.push(open.buf.len() as u16);
    }

    /// Turns the open chunk, if any, into a sealed one of exactly its size.
    fn seal(&mut self) {
        if let Some(open) = self.open.take() {
            let mut open = *open;
            open.buf.shrink_to_fit();
            self.sealed.push_back(Sealed {
                start: open.start,
                data: Bytes::from(open.buf),
                ends: open.ends.into_boxed_slice(),
            });
        }
    }

    /// Drops everything before `before`. A chunk cut in two keeps only its retained part, in an
    /// allocation of that size, so that what is released is given back at once.
    fn release(&mut self, before: u64) {
        while self
            .sealed
            .front()
            .is_some_and(|c| c.start + c.data.len() as u64 <= before)
        {
            self.sealed.pop_front();
        }
        let cut = |start: u64, ends: &[u16]| -> (usize, Vec<u16>) {
            let dead = (before - start) as usize;
            let kept = ends
                .iter()
                .filter(|&&e| e as usize > dead)
                .map(|&e| e - dead as u16)
                .collect();
            (dead, kept)
        };
        if let Some(c) = self.sealed.front_mut() {
            if c.start < before {
                let (dead, ends) = cut(c.start, &c.ends);
                c.data = Bytes::copy_from_slice(&c.data[dead..]);
                if !c.ends.is_empty() {
                    c.ends = ends.into_boxed_slice();
                }
                c.start = before;
            }
        } else if let Some(o) = &mut self.open {
            if o.start + o.buf.len() as u64 <= before {
                self.open = None;
            } else if o.start < before {
                let (dead, ends) = cut(o.start, &o.ends);
                o.buf.drain(..dead);
                o.ends = ends;
                o.start = before;
            }
        }
    }

    /// Reads `[from, until)`: the storage contract's rules (see the module docs of `storage`).
    /// A read from inside the retained range may start anywhere when `split`, else only at a
    /// record's start.
    fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> Result<ReadChunk, StorageError> {
        let mut out = ReadChunk {
            parts: Vec::new(),
            end: from,
        };
        if from >= until {
            return Ok(out);
        }
        if from < self.start {
            return Err(StorageError::Misaligned { pos: from });
        }
        // (chunk, first byte, end) of each piece, relative to its chunk.
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        let mut budget = max_bytes;
        let mut pos = from;
        let mut i = self
            .sealed
            .partition_point(|c| c.start + c.data.len() as u64 <= from);
        'chunks: while i < self.chunks() {
            let v = self.view(i);
            if v.start >= until {
                break;
            }
            if v.end() <= pos {
                i += 1;
                continue;
            }
            if split {
                if budget == 0 {
                    break;
                }
                let hi = v.end().min(until).min(pos.saturating_add(budget as u64));
                pieces.push((i, (pos - v.start) as usize, (hi - v.start) as usize));
                budget -= (hi - pos) as usize;
                pos = hi;
                if pos < v.end() {
                    break;
                }
            } else {
                let rel = (pos - v.start) as usize;
                let mut j = v.ends.partition_point(|&e| e as usize <= rel);
                if v.record_start(j) != rel {
                    return Err(StorageError::Misaligned { pos });
                }
                while j < v.records() {
                    let (lo, hi) = (v.record_start(j), v.record_end(j));
                    let end = v.start + hi as u64;
                    if v.start + lo as u64 >= until {
                        break 'chunks;
                    }
                    if end > until {
                        // `until` inside a record can only come from a client-made fork offset.
                        return Err(StorageError::Misaligned { pos: until });
                    }
                    let len = hi - lo;
                    if !pieces.is_empty() && (budget == 0 || len > budget) {
                        break 'chunks;
                    }
                    pieces.push((i, lo, hi));
                    budget = budget.saturating_sub(len);
                    pos = end;
                    j += 1;
                }
            }
            i += 1;
        }
        out.end = pos;
        // Sealed chunks are shared; what comes from the open chunk is copied once and shared
        // by its pieces.
        let open_index = self.sealed.len();
        let copied = match (pieces.iter().find(|p| p.0 == open_index), &self.open) {
            (Some(first), Some(open)) => {
                let last = pieces.last().map_or(first.2, |p| p.2);
                Some((first.1, Bytes::copy_from_slice(&open.buf[first.1..last])))
            }
            _ => None,
        };
        out.parts = pieces
            .iter()
            .map(|&(i, lo, hi)| match (self.sealed.get(i), &copied) {
                (Some(c), _) => c.data.slice(lo..hi),
                (None, Some((base, bytes))) => bytes.slice(lo - base..hi - base),
                (None, None) => Bytes::new(),
            })
            .collect();
        Ok(out)
    }
}

impl MemoryLog {
    fn new(start: u64) -> Self {
        MemoryLog {
            records: RwLock::new(Records {
                start,
                released: false,
                sealed: VecDeque::new(),
                open: None,
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
        log.read(from, until, max_bytes, split)
    }
}

impl StreamLog for MemoryLog {
    /// Copies the record into the log (the storage says it does: the stream layer hands over
    /// the request's own bytes).
    fn append(&self, entry: AppendEntry) -> Commit {
        if let Some(data) = entry.data.filter(|d| !d.is_empty()) {
            self.records.write().push(entry.start, &data);
        }
        done()
    }

    fn mark_soft_deleted(&self) -> Commit {
        done()
    }

    fn remove(&self) -> Commit {
        // Readers holding `Bytes` keep their pieces alive; the chunks go now.
        let mut log = self.records.write();
        log.sealed = VecDeque::new();
        log.open = None;
        done()
    }

    /// Drops the records that end at or before `before`: the stream layer passes a record
    /// boundary, so no record straddles it. The bytes go at once (readers holding `Bytes` of
    /// them keep just those chunks alive).
    fn release(&self, before: u64) -> Commit {
        let mut log = self.records.write();
        if before <= log.start {
            return done();
        }
        log.release(before);
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
    use crate::storage::plan_read;
    use proptest::prelude::*;

    fn log_of(start: u64, parts: &[&[u8]]) -> Records {
        let mut r = Records {
            start,
            released: false,
            sealed: VecDeque::new(),
            open: None,
        };
        let mut at = start;
        for p in parts {
            r.push(at, p);
            at += p.len() as u64;
        }
        r
    }

    fn joined(chunk: &ReadChunk) -> Vec<u8> {
        chunk.parts.concat()
    }

    #[test]
    fn reads_whole_records_until_budget() {
        let r = log_of(0, &[b"abc", b"de", b"fghi"]);
        let c = r.read(0, 9, 4, false).unwrap();
        assert_eq!(joined(&c), b"abc");
        assert_eq!(c.end, 3);
        let c = r.read(3, 9, 100, false).unwrap();
        assert_eq!(c.parts, vec![&b"de"[..], &b"fghi"[..]]);
        assert_eq!(c.end, 9);
    }

    #[test]
    fn always_returns_one_record_even_over_budget() {
        let r = log_of(0, &[b"abcdef"]);
        let c = r.read(0, 6, 2, false).unwrap();
        assert_eq!(joined(&c), b"abcdef");
    }

    #[test]
    fn split_reads_cut_inside_records_and_respect_until() {
        let r = log_of(0, &[b"abc", b"def"]);
        let c = r.read(1, 5, 100, true).unwrap();
        assert_eq!(joined(&c), b"bcde");
        assert_eq!(c.end, 5);
        let c = r.read(0, 6, 4, true).unwrap();
        assert_eq!(joined(&c), b"abcd");
        assert_eq!(c.end, 4);
    }

    #[test]
    fn unsplittable_read_from_inside_a_record_is_misaligned() {
        let r = log_of(0, &[b"abc", b"def"]);
        assert!(matches!(
            r.read(1, 6, 100, false),
            Err(StorageError::Misaligned { pos: 1 })
        ));
        assert!(matches!(
            r.read(0, 4, 100, false),
            Err(StorageError::Misaligned { pos: 4 })
        ));
    }

    #[test]
    fn small_records_share_chunks_and_large_ones_stand_alone() {
        let small = vec![7u8; 100];
        let large = vec![9u8; SMALL_RECORD + 1];
        let mut parts: Vec<&[u8]> = vec![&small; 300];
        parts.push(&large);
        parts.push(&small);
        let r = log_of(0, &parts);
        // 300 records of 100 bytes fill two full chunks (143 each) and part of a third, sealed
        // by the large record, which has a chunk of its own; the last record opens a new one.
        assert_eq!(r.sealed.len(), 4);
        assert_eq!(r.sealed[0].ends.len(), CHUNK_BYTES / 100);
        assert_eq!(r.sealed[0].data.len(), CHUNK_BYTES / 100 * 100);
        assert!(r.sealed[3].ends.is_empty());
        assert_eq!(r.sealed[3].data.len(), large.len());
        assert_eq!(r.open.as_ref().unwrap().ends.len(), 1);
        // A byte-stream read returns one piece per chunk.
        let total = 301 * 100 + large.len() as u64;
        let c = r.read(0, total, usize::MAX, true).unwrap();
        assert_eq!(c.parts.len(), 5);
        assert_eq!(c.end, total);
        // A record read returns one piece per record.
        let c = r.read(0, total, usize::MAX, false).unwrap();
        assert_eq!(c.parts.len(), 302);
    }

    #[test]
    fn the_open_chunk_grows_by_size_classes() {
        let mut r = log_of(0, &[b"x"]);
        assert_eq!(r.open.as_ref().unwrap().buf.capacity(), 16);
        let mut at = 1;
        for _ in 0..200 {
            r.push(at, &[1u8; 50]);
            at += 50;
            let cap = r.open.as_ref().map_or(0, |o| o.buf.capacity());
            assert!(cap <= CHUNK_BYTES);
            assert_eq!(cap, size_class(cap), "{cap} is not a size class");
        }
        assert_eq!(size_class(129), 160);
        assert_eq!(size_class(14_000), CHUNK_BYTES);
    }

    #[test]
    fn releases_free_whole_chunks_and_cut_the_first() {
        let rec = [3u8; 1000];
        let parts: Vec<&[u8]> = vec![&rec; 40];
        let log = MemoryLog::new(0);
        let mut at = 0;
        for p in &parts {
            drop(log.append(AppendEntry {
                start: at,
                data: Some(Bytes::copy_from_slice(p)),
                ..AppendEntry::default()
            }));
            at += p.len() as u64;
        }
        assert_eq!(log.records.read().sealed.len(), 2);
        // Inside the second sealed chunk (14 records each): the first goes, the second is cut.
        drop(log.release(20_000));
        {
            let r = log.records.read();
            assert_eq!(r.sealed.len(), 1);
            assert_eq!(r.sealed[0].start, 20_000);
            assert_eq!(r.sealed[0].data.len(), 8_000);
            assert_eq!(r.sealed[0].ends.len(), 8);
        }
        assert!(matches!(
            log.read_now(0, 40_000, 100, false),
            Err(StorageError::Released { start: 20_000 })
        ));
        let c = log.read_now(20_000, 40_000, usize::MAX, false).unwrap();
        assert_eq!(c.parts.len(), 20);
        assert_eq!(c.end, 40_000);
        // Into the open chunk.
        drop(log.release(35_000));
        {
            let r = log.records.read();
            assert!(r.sealed.is_empty());
            assert_eq!(r.open.as_ref().unwrap().buf.len(), 5_000);
        }
        assert_eq!(
            joined(&log.read_now(35_000, 40_000, usize::MAX, true).unwrap()),
            vec![3u8; 5_000]
        );
        // Everything, then appends go on from there.
        drop(log.release(40_000));
        assert!(log.records.read().open.is_none());
        drop(log.append(AppendEntry {
            start: 40_000,
            data: Some(Bytes::from_static(b"next")),
            ..AppendEntry::default()
        }));
        assert_eq!(
            joined(&log.read_now(40_000, 40_004, 100, false).unwrap()),
            b"next"
        );
        // Releasing at or below the retained start changes nothing.
        drop(log.release(3));
        assert_eq!(
            log.read_now(40_000, 40_004, 100, false).unwrap().end,
            40_004
        );
    }

    #[test]
    fn readers_keep_what_they_read_while_the_open_chunk_grows() {
        let mut r = log_of(0, &[b"abc"]);
        let c = r.read(0, 3, 100, false).unwrap();
        for i in 0..1000u64 {
            r.push(3 + i * 10, b"0123456789");
        }
        assert_eq!(joined(&c), b"abc");
    }

    #[test]
    fn empty_range_reads_nothing() {
        let r = log_of(0, &[b"abc"]);
        let c = r.read(3, 3, 100, false).unwrap();
        assert!(c.parts.is_empty());
        assert_eq!(c.end, 3);
    }

    /// The reference: every record its own buffer, read with the shared planner.
    fn reference(
        start: u64,
        records: &[Vec<u8>],
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> Result<(Vec<Vec<u8>>, u64), u64> {
        let mut starts = Vec::new();
        let mut at = start;
        for r in records {
            starts.push(at);
            at += r.len() as u64;
        }
        match plan_read(
            records.len(),
            |i| (starts[i], records[i].len() as u64),
            start,
            from,
            until,
            max_bytes,
            split,
        ) {
            Ok((pieces, end)) => Ok((
                pieces
                    .iter()
                    .map(|p| records[p.record][p.skip..p.skip + p.len].to_vec())
                    .collect(),
                end,
            )),
            Err(StorageError::Misaligned { pos }) => Err(pos),
            Err(e) => panic!("{e}"),
        }
    }

    proptest! {
        #[test]
        fn reads_match_one_buffer_per_record(
            sizes in prop::collection::vec(
                prop_oneof![1usize..200, 1usize..3000, Just(SMALL_RECORD), Just(SMALL_RECORD + 1)],
                0..120,
            ),
            start in 0u64..3,
            reads in prop::collection::vec((0.0f64..1.0, 0.0f64..1.0, 0usize..20_000, any::<bool>()), 1..20),
        ) {
            let records: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|b| (b as u8).wrapping_mul(31).wrapping_add(i as u8)).collect())
                .collect();
            let mut log = log_of(start, &records.iter().map(Vec::as_slice).collect::<Vec<_>>());
            let total: u64 = records.iter().map(|r| r.len() as u64).sum();
            for (f, u, max_bytes, split) in reads {
                let from = start + (f * total as f64) as u64;
                let until = from + (u * (start + total - from) as f64) as u64;
                let want = reference(start, &records, from, until, max_bytes, split);
                match (log.read(from, until, max_bytes, split), want) {
                    (Ok(got), Ok((parts, end))) => {
                        prop_assert_eq!(got.end, end);
                        if split {
                            prop_assert_eq!(got.parts.concat(), parts.concat());
                        } else {
                            let got: Vec<Vec<u8>> = got.parts.iter().map(|p| p.to_vec()).collect();
                            prop_assert_eq!(got, parts);
                        }
                    }
                    (Err(StorageError::Misaligned { pos }), Err(want)) => prop_assert_eq!(pos, want),
                    (got, want) => prop_assert!(false, "got {:?}, want {:?}", got.map(|c| c.end), want),
                }
            }
            // Released at a record boundary, the rest reads the same.
            if records.len() > 1 {
                let k = records.len() / 2;
                let cut: u64 = start + records[..k].iter().map(|r| r.len() as u64).sum::<u64>();
                log.release(cut);
                log.start = cut;
                let got = log.read(cut, start + total, usize::MAX, false).unwrap();
                let got: Vec<Vec<u8>> = got.parts.iter().map(|p| p.to_vec()).collect();
                prop_assert_eq!(got, records[k..].to_vec());
            }
        }
    }
}
