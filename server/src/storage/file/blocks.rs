//! The sparse record index of the file modes: a stream keeps one [`Block`] per run of its
//! records in RAM, not one entry per record. A block says which stream positions it holds and
//! which span of one segment holds their frames; a read (or a rewrite forward) reads that span
//! and takes the stream's records out of its frames ([`scan`]). About 40 bytes per block of up
//! to [`MAX_BLOCK_RECORDS`] records: RAM per stored record is a hundredth of a byte for small
//! appends to one stream, and at most one block per record when every record is large or a
//! stream's records are spread thinly through a log other streams fill.
//!
//! The blocks are a function of the log alone: the writer and recovery build them with the same
//! rules from the same frames in the same order, so a STATE frame's moved records (which replace
//! whole blocks) fall on the same block boundaries in both.

use std::collections::VecDeque;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::frame;
use crate::storage::StreamId;

/// Most records in one block.
pub(crate) const MAX_BLOCK_RECORDS: u32 = 4096;
/// Most bytes of log one block spans (a single larger frame gets a block of its own): what a
/// read of any record in the block reads at most, beyond the record itself.
pub(crate) const MAX_BLOCK_SPAN: u64 = 1 << 20;

/// A run of a stream's consecutive records whose frames lie in one span of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Block {
    /// Stream position of the first record.
    pub start: u64,
    /// Stream position after the last record.
    pub end: u64,
    /// Segment offset of the first frame holding a record of the block.
    pub off: u64,
    /// Bytes from `off` to the end of the last such frame.
    pub span: u32,
    pub seg: u32,
    /// Records in the block.
    pub count: u32,
    /// The span is one CREATE or STATE frame whose records are the block (never extended);
    /// otherwise the block's records are the stream's APPEND frames in the span.
    pub packed: bool,
}

impl Block {
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// A stream's blocks, ascending and contiguous (each starts where the one before ends).
#[derive(Clone, Debug, Default)]
pub(crate) struct Blocks {
    pub list: VecDeque<Block>,
}

impl Blocks {
    pub fn iter(&self) -> impl Iterator<Item = &Block> {
        self.list.iter()
    }

    pub fn first(&self) -> Option<&Block> {
        self.list.front()
    }

    pub fn last(&self) -> Option<&Block> {
        self.list.back()
    }

    /// Notes an APPEND frame at `frame_off` of `seg` (`frame_len` bytes) holding the record
    /// `[start, start + len)`: the newest block takes it if it can, else a new block starts.
    pub fn push_append(&mut self, start: u64, len: u64, seg: u32, frame_off: u64, frame_len: u64) {
        if let Some(b) = self.list.back_mut()
            && !b.packed
            && b.seg == seg
            && b.end == start
            && b.count < MAX_BLOCK_RECORDS
            && frame_off >= b.off
            && frame_off + frame_len - b.off <= MAX_BLOCK_SPAN
        {
            b.end += len;
            b.count += 1;
            b.span = (frame_off + frame_len - b.off) as u32;
            return;
        }
        self.list.push_back(Block {
            start,
            end: start + len,
            off: frame_off,
            span: frame_len as u32,
            seg,
            count: 1,
            packed: false,
        });
    }

    /// Drops the blocks whose records all end at or before `before`, giving each to `gone`. A
    /// block with a record after `before` stays whole (reads below the retained start are
    /// refused before they get here).
    pub fn drop_released(&mut self, before: u64, mut gone: impl FnMut(&Block)) {
        while let Some(b) = self.list.front().filter(|b| b.end <= before) {
            gone(b);
            self.list.pop_front();
        }
    }

    /// Puts `block` (a CREATE or STATE frame's records, `[block.start, block.end)`) in place of
    /// the blocks holding those positions, giving each replaced block to `gone`. `Err` if a
    /// block runs past `block.end` (the moved records would not replace whole blocks).
    pub fn replace(&mut self, block: Block, mut gone: impl FnMut(&Block)) -> Result<(), String> {
        let from = self.list.partition_point(|b| b.end <= block.start);
        let to = self.list.partition_point(|b| b.start < block.end);
        if let Some(b) = self.list.get(to.wrapping_sub(1)).filter(|_| to > from)
            && b.end > block.end
        {
            return Err(format!(
                "records moved to [{}, {}) end inside a block [{}, {})",
                block.start, block.end, b.start, b.end
            ));
        }
        for b in self.list.drain(from..to) {
            gone(&b);
        }
        self.list.insert(from, block);
        Ok(())
    }

    /// Index of the first block ending after `pos`.
    pub fn find(&self, pos: u64) -> usize {
        self.list.partition_point(|b| b.end <= pos)
    }
}

/// Takes the records of `block` that end after `from` out of `span`, the bytes of its span:
/// `(start, data)` each, sliced from `span` (no copy). Checks that the block's records are
/// exactly what the index says.
pub(crate) fn scan(
    id: StreamId,
    block: &Block,
    span: &Bytes,
    from: u64,
) -> Result<Vec<(u64, Bytes)>, String> {
    let mut out = Vec::new();
    let (mut pos, mut count) = (block.start, 0u32);
    let mut take = |start: u64, data: &dyn Fn() -> Bytes, len: u64| {
        if start != pos {
            return Err(format!("record at {start} where {pos} was expected"));
        }
        pos += len;
        count += 1;
        if pos > from {
            out.push((start, data()));
        }
        Ok(())
    };
    if block.packed {
        let (decoded, _) = frame::decode(span).map_err(|e| format!("{e:?}"))?;
        let records = match decoded {
            frame::Decoded::Create { meta, records } if meta.meta.id == id => records,
            frame::Decoded::State { state, records } if state.meta.id == id => records,
            other => return Err(format!("expected a frame of stream {id}, found {other:?}")),
        };
        let mut at_pos = block.start;
        for (rel, len) in records {
            let at = frame::FRAME_HEADER_LEN + rel;
            take(at_pos, &|| span.slice(at..at + len), len as u64)?;
            at_pos += len as u64;
        }
    } else {
        let mut at = 0usize;
        while at < span.len() {
            let rest = &span[at..];
            if rest.len() < frame::FRAME_HEADER_LEN {
                return Err(format!("frame header cut short at {at}"));
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let total = frame::FRAME_HEADER_LEN + len;
            if total > rest.len() {
                return Err(format!("frame at {at} runs past the block"));
            }
            if rest[8] == frame::KIND_APPEND && len >= 20 {
                let p = &rest[frame::FRAME_HEADER_LEN..total];
                let fid = u64::from_le_bytes(p[0..8].try_into().unwrap_or_default());
                let start = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                let json = u32::from_le_bytes(p[16..20].try_into().unwrap_or_default()) as usize;
                let data = frame::FRAME_HEADER_LEN + 20 + json;
                if fid == id && start >= block.start && start < block.end && data < total {
                    let from = at;
                    take(
                        start,
                        &|| span.slice(from + data..from + total),
                        (total - data) as u64,
                    )?;
                }
            }
            at += total;
        }
    }
    if pos != block.end || count != block.count {
        return Err(format!(
            "{count} records ending at {pos} where the index says {} ending at {}",
            block.count, block.end
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_fill_a_block_until_a_limit_or_a_gap() {
        let mut b = Blocks::default();
        for i in 0..MAX_BLOCK_RECORDS as u64 + 1 {
            b.push_append(i * 10, 10, 1, 16 + i * 40, 40);
        }
        assert_eq!(b.list.len(), 2);
        assert_eq!(b.list[0].count, MAX_BLOCK_RECORDS);
        assert_eq!(b.list[1].start, u64::from(MAX_BLOCK_RECORDS) * 10);
        // Another segment starts a block.
        let end = b.last().unwrap().end;
        b.push_append(end, 5, 2, 16, 30);
        assert_eq!(b.list.len(), 3);
        // So does a span past the limit.
        b.push_append(end + 5, 5, 2, 16 + MAX_BLOCK_SPAN, 30);
        assert_eq!(b.list.len(), 4);
        let mut gone = 0;
        b.drop_released(end + 1, |blk| gone += blk.count);
        assert_eq!((gone, b.list.len()), (MAX_BLOCK_RECORDS + 1, 2));
    }

    #[test]
    fn moved_records_replace_whole_blocks() {
        let mut b = Blocks::default();
        for i in 0..3u64 {
            b.push_append(i * 10, 10, i as u32 + 1, 16, 40);
        }
        let moved = Block {
            start: 5,
            end: 20,
            off: 100,
            span: 60,
            seg: 9,
            count: 2,
            packed: true,
        };
        let mut gone = Vec::new();
        b.replace(moved, |blk| gone.push(blk.seg)).unwrap();
        assert_eq!(gone, vec![1, 2]);
        assert_eq!(b.list.iter().map(|x| x.seg).collect::<Vec<_>>(), vec![9, 3]);
        let inside = Block {
            start: 20,
            end: 25,
            ..moved
        };
        assert!(b.replace(inside, |_| {}).is_err());
    }
}
