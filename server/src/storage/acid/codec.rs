//! Byte encodings of the values the `acid` tables hold. Every value ends in a CRC-32C so that a
//! flipped bit on disk is refused loudly instead of served; redb checksums its pages too, but only
//! verifies them when it repairs a file after a crash.

use super::super::{ProducerTuple, StorageError, StreamId, StreamMeta};
use serde::{Deserialize, Serialize};

/// Version byte that starts every state row: 2 adds the retained start (`released`); a
/// version 1 row (written before retention) is read with `released = tail - own_bytes`, the
/// log start.
const STATE_VERSION: u8 = 2;
/// Version of the `streams` table's JSON.
const META_VERSION: u32 = 1;

const CLOSED: u8 = 1;
const SOFT_DELETED: u8 = 2;

const CRC_LEN: usize = 4;

/// The small per-stream row rewritten (once per write transaction) when a stream changes. It
/// holds only fixed-size fields and the two short strings, never anything that grows with the
/// stream or with its producers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
///
/// In RAM the engine and the writers keep one per stream they have seen, so it is kept small
/// (64 bytes): the own-bytes field is not kept (it is `tail - released`, checked when a row is
/// read), and the rarely set strings are boxed.
pub(super) struct StateRow {
    pub tail: u64,
    /// The retained start: records before it are released (the log start when none are).
    pub released: u64,
    pub last_access_ms: u64,
    /// Not stored: the number of the commit log record that last changed the row (set by the
    /// engine; 0 for a row as redb has it), so that the engine can drop rows every shard's
    /// checkpoint holds.
    pub lsn: u64,
    pub closed: bool,
    pub soft_deleted: bool,
    pub closed_by: Option<Box<ProducerTuple>>,
    pub last_seq: Option<Box<str>>,
}

impl StateRow {
    /// Bytes retained: `tail - released`.
    pub(super) fn own_bytes(&self) -> u64 {
        self.tail.saturating_sub(self.released)
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(STATE_VERSION);
        let mut flags = 0;
        if self.closed {
            flags |= CLOSED;
        }
        if self.soft_deleted {
            flags |= SOFT_DELETED;
        }
        out.push(flags);
        out.extend_from_slice(&self.tail.to_le_bytes());
        out.extend_from_slice(&self.own_bytes().to_le_bytes());
        out.extend_from_slice(&self.last_access_ms.to_le_bytes());
        out.extend_from_slice(&self.released.to_le_bytes());
        match &self.last_seq {
            Some(seq) => {
                out.push(1);
                put_str(&mut out, seq);
            }
            None => out.push(0),
        }
        match &self.closed_by {
            Some(by) => {
                out.push(1);
                put_str(&mut out, &by.id);
                out.extend_from_slice(&by.epoch.to_le_bytes());
                out.extend_from_slice(&by.seq.to_le_bytes());
            }
            None => out.push(0),
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(super) fn decode(id: StreamId, raw: &[u8]) -> Result<StateRow, StorageError> {
        let corrupt = |detail: &str| StorageError::Corrupt {
            what: format!("state row of stream {id}"),
            detail: detail.to_owned(),
        };
        let body = unseal(raw).ok_or_else(|| corrupt("checksum mismatch"))?;
        let mut r = Reader(body);
        let version = r.u8()?;
        if version != 1 && version != STATE_VERSION {
            return Err(corrupt("unknown version"));
        }
        let flags = r.u8()?;
        let tail = r.u64()?;
        let own_bytes = r.u64()?;
        let last_access_ms = r.u64()?;
        let released = if version == 1 {
            tail.saturating_sub(own_bytes)
        } else {
            r.u64()?
        };
        // Every writer keeps it so; a row that says otherwise is damaged.
        if released > tail || tail - released != own_bytes {
            return Err(corrupt(&format!(
                "{own_bytes} own bytes, but retained [{released}, {tail})"
            )));
        }
        let mut row = StateRow {
            tail,
            released,
            last_access_ms,
            lsn: 0,
            closed: flags & CLOSED != 0,
            soft_deleted: flags & SOFT_DELETED != 0,
            closed_by: None,
            last_seq: None,
        };
        if r.u8()? == 1 {
            row.last_seq = Some(r.string()?.into());
        }
        if r.u8()? == 1 {
            row.closed_by = Some(Box::new(ProducerTuple {
                id: r.string()?,
                epoch: r.u64()?,
                seq: r.u64()?,
            }));
        }
        if !r.0.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(row)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings here are header values the HTTP layer already bounded far below 4 GiB.
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A bounds-checked cursor: running past the end is corruption, never a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], StorageError> {
        if self.0.len() < n {
            return Err(StorageError::Corrupt {
                what: "state row".into(),
                detail: "truncated".into(),
            });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, StorageError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, StorageError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        let len = u32::from_le_bytes(b) as usize;
        let raw = self.take(len)?.to_vec();
        String::from_utf8(raw).map_err(|_| StorageError::Corrupt {
            what: "state row".into(),
            detail: "string is not UTF-8".into(),
        })
    }
}

/// The `streams` table value: the stream's configuration as JSON, fixed at creation.
#[derive(Serialize, Deserialize)]
struct StoredMeta {
    version: u32,
    meta: StreamMeta,
}

pub(super) fn encode_meta(meta: &StreamMeta) -> Vec<u8> {
    let stored = StoredMeta {
        version: META_VERSION,
        meta: meta.clone(),
    };
    // Serialising plain strings and integers cannot fail.
    let mut out = serde_json::to_vec(&stored).unwrap_or_default();
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub(super) fn decode_meta(id: StreamId, raw: &[u8]) -> Result<StreamMeta, StorageError> {
    let corrupt = |detail: String| StorageError::Corrupt {
        what: format!("metadata of stream {id}"),
        detail,
    };
    let body = unseal(raw).ok_or_else(|| corrupt("checksum mismatch".into()))?;
    let stored: StoredMeta = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
    if stored.version != META_VERSION {
        return Err(corrupt(format!("unknown version {}", stored.version)));
    }
    if stored.meta.id != id {
        return Err(corrupt(format!("row holds stream {}", stored.meta.id)));
    }
    Ok(stored.meta)
}

/// A row of the `records` table is sized so that the redb leaf page holding it (the row alone:
/// a row this large never shares its leaf) is at most this long. redb gives a page a power-of-two
/// size and reads a page whole, so a row just over a power of two would cost twice its size in
/// every read (and on disk): 8 records of 4 KiB, 32 KiB of data, would take a 64 KiB page, and a
/// row holding one 64 KiB record a 128 KiB one. So rows hold the records that fit, and a record
/// larger than a row can hold is split across consecutive rows (see [`FIRST_CONTINUES`]).
///
/// 64 KiB rather than 32: a catch-up read pays per row too (each page redb reads misses its
/// cache, and while non-durable commits have left pages in its write buffer, as the commit log's
/// do, a miss tries each of its 131 write-buffer stripes: 11% of the server's time in a catch-up
/// of 64 KiB appends with 32 KiB rows). Measured on that catch-up, alternating builds: 32 KiB rows
/// 0.64 / 0.81 GB/s, 64 KiB 0.83 / 0.85, 256 KiB 0.87 (one run; its shard files 1.4 GB, not 1.1).
pub(super) const ROW_PAGE_BYTES: usize = 64 << 10;
/// A row of the `records` table holds at most this many records.
pub(super) const ROW_RECORDS: usize = 1024;

/// What a redb leaf page holding one row adds to the row value: the page header (4 bytes), the
/// value's end offset (4; the key is fixed-width and has none) and the key (16).
const LEAF_OVERHEAD: usize = 4 + 4 + 16;

const COUNT_LEN: usize = 4;
const LEN_LEN: usize = 4;

/// Bit of a row's count word (format version 3): the row's first entry is not a record of its
/// own but the rest of the previous row's last entry (a record split across rows).
const FIRST_CONTINUES: u32 = 1 << 31;
/// Bit of a row's count word: the row's last entry is the start of a record that the next row
/// goes on with.
const LAST_CONTINUES: u32 = 1 << 30;
/// Bit of a row's count word (format version 4): the row holds references into a commit log
/// segment instead of the records' bytes ([`write_ref_row`]).
const REFS: u32 = 1 << 29;
/// The entry count's bits of the count word.
const COUNT_MASK: u32 = REFS - 1;
/// A reference row's segment number.
const SEGMENT_LEN: usize = 8;
/// A reference: the record's offset in the segment (u64) and its length (u32).
const REF_LEN: usize = 12;

/// How a row's first and last entries join its neighbours' (both false: whole records only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Joins {
    /// The first entry goes on with the previous row's last one.
    pub first_continues: bool,
    /// The last entry goes on in the next row.
    pub last_continues: bool,
}

/// Data bytes that one more entry can hold in a row of `count` entries holding `data` bytes, for
/// the row to stay within a [`ROW_PAGE_BYTES`] leaf (0 when it cannot take one).
pub(super) fn row_room(count: usize, data: usize) -> usize {
    ROW_PAGE_BYTES
        .saturating_sub(LEAF_OVERHEAD + COUNT_LEN + LEN_LEN * (count + 1) + data + CRC_LEN)
}

/// Whether a row of `count` records holding `data` bytes in all fits a [`ROW_PAGE_BYTES`] leaf.
pub(super) fn row_fits_page(count: usize, data: usize) -> bool {
    LEAF_OVERHEAD + COUNT_LEN + LEN_LEN * count + data + CRC_LEN <= ROW_PAGE_BYTES
}

/// Length of the row value holding `records` (each non-empty, each under 4 GiB: a request body,
/// and so a record, is at most 1 GiB, `DS_LIMITS__MAX_REQUEST_BYTES`'s bound).
pub(super) fn row_value_len(records: &[&[u8]]) -> usize {
    COUNT_LEN + LEN_LEN * records.len() + records.iter().map(|r| r.len()).sum::<usize>() + CRC_LEN
}

/// The checksum of a row covers its key too, so a row found under the wrong stream or position
/// is refused like a damaged one.
fn row_crc(id: StreamId, start: u64, body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&id.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &start.to_le_bytes());
    crc32c::crc32c_append(crc, body)
}

/// Writes the row value of `records` (entries: records, or pieces of a split one as `joins`
/// says), which start at stream position `start`, into `out` (exactly [`row_value_len`] long):
/// the count word (u32 LE: the entry count, with [`FIRST_CONTINUES`] and [`LAST_CONTINUES`]),
/// each entry's length (u32 LE), the entries' bytes, then the CRC-32C of
/// `id LE ‖ start LE ‖ everything before it`.
pub(super) fn write_row(out: &mut [u8], id: StreamId, start: u64, records: &[&[u8]], joins: Joins) {
    let body_len = out.len() - CRC_LEN;
    let (body, crc) = out.split_at_mut(body_len);
    let (count, rest) = body.split_at_mut(COUNT_LEN);
    let mut word = records.len() as u32;
    if joins.first_continues {
        word |= FIRST_CONTINUES;
    }
    if joins.last_continues {
        word |= LAST_CONTINUES;
    }
    count.copy_from_slice(&word.to_le_bytes());
    let (lens, mut data) = rest.split_at_mut(LEN_LEN * records.len());
    for (len, record) in lens.chunks_exact_mut(LEN_LEN).zip(records) {
        len.copy_from_slice(&(record.len() as u32).to_le_bytes());
        let (here, after) = data.split_at_mut(record.len());
        here.copy_from_slice(record);
        data = after;
    }
    crc.copy_from_slice(&row_crc(id, start, body).to_le_bytes());
}

/// Length of the reference row holding `count` references.
pub(super) fn ref_row_value_len(count: usize) -> usize {
    COUNT_LEN + SEGMENT_LEN + REF_LEN * count + CRC_LEN
}

/// Writes the reference row of records that start at stream position `start` and whose bytes
/// are in commit log segment `segment` at `refs` (offset, length), into `out` (exactly
/// [`ref_row_value_len`] long): the count word (u32 LE: the count, with [`REFS`]), the segment
/// (u64 LE), each reference (offset u64 LE, length u32 LE), then the CRC-32C of `id LE ‖ start
/// LE ‖ everything before it`. Records of a reference row are whole (never split across rows).
pub(super) fn write_ref_row(
    out: &mut [u8],
    id: StreamId,
    start: u64,
    segment: u64,
    refs: &[(u64, u32)],
) {
    let body_len = out.len() - CRC_LEN;
    let (body, crc) = out.split_at_mut(body_len);
    body[..COUNT_LEN].copy_from_slice(&(refs.len() as u32 | REFS).to_le_bytes());
    body[COUNT_LEN..COUNT_LEN + SEGMENT_LEN].copy_from_slice(&segment.to_le_bytes());
    for (slot, (offset, len)) in body[COUNT_LEN + SEGMENT_LEN..]
        .chunks_exact_mut(REF_LEN)
        .zip(refs)
    {
        slot[..8].copy_from_slice(&offset.to_le_bytes());
        slot[8..].copy_from_slice(&len.to_le_bytes());
    }
    crc.copy_from_slice(&row_crc(id, start, body).to_le_bytes());
}

/// One entry of a row: the bytes themselves, or where in the commit log they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Entry<'a> {
    Inline(&'a [u8]),
    At { segment: u64, offset: u64, len: u32 },
}

impl Entry<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Entry::Inline(b) => b.len(),
            Entry::At { len, .. } => *len as usize,
        }
    }
}

/// What a row holds.
enum Body<'a> {
    /// Its record lengths and its records' bytes, back to back.
    Inline { lens: &'a [u8], data: &'a [u8] },
    /// The segment and the references into it.
    Refs { segment: u64, refs: &'a [u8] },
}

/// The parts of a row value.
pub(super) struct Row<'a> {
    body: Body<'a>,
    data_len: u64,
    joins: Joins,
}

impl<'a> Row<'a> {
    /// Bytes of data the row holds (all its records).
    pub(super) fn data_len(&self) -> u64 {
        self.data_len
    }

    /// How the row's first and last entries join its neighbours'.
    pub(super) fn joins(&self) -> Joins {
        self.joins
    }

    /// The row's records' bytes, back to back, if the row holds them (not references).
    pub(super) fn data(&self) -> Option<&'a [u8]> {
        match self.body {
            Body::Inline { data, .. } => Some(data),
            Body::Refs { .. } => None,
        }
    }

    /// The segment a reference row points into.
    pub(super) fn segment(&self) -> Option<u64> {
        match self.body {
            Body::Inline { .. } => None,
            Body::Refs { segment, .. } => Some(segment),
        }
    }

    /// The row's entries in order.
    pub(super) fn entries(&self) -> impl Iterator<Item = Entry<'a>> + use<'a> {
        let (lens, mut data, segment, refs): (&[u8], &[u8], u64, &[u8]) = match self.body {
            Body::Inline { lens, data } => (lens, data, 0, &[]),
            Body::Refs { segment, refs } => (&[], &[], segment, refs),
        };
        let inline = lens.chunks_exact(LEN_LEN).map(move |len| {
            let (record, rest) = data.split_at(u32_at(len) as usize);
            data = rest;
            Entry::Inline(record)
        });
        let at = refs.chunks_exact(REF_LEN).map(move |r| Entry::At {
            segment,
            offset: u64_at(&r[..8]),
            len: u32_at(&r[8..]),
        });
        inline.chain(at)
    }
}

/// Splits a row value into its parts after checking its structure (at least one record, none
/// empty, lengths adding up to the bytes present), not its checksum: for recovery, which only
/// needs where a stream's last row ends, and for planning reads before [`read_row`] checks the
/// rows a read serves.
pub(super) fn parse_row(id: StreamId, start: u64, raw: &[u8]) -> Result<Row<'_>, StorageError> {
    let malformed = || StorageError::Corrupt {
        what: format!("record row of stream {id} at {start}"),
        detail: "malformed (record count and lengths do not match its size)".into(),
    };
    if raw.len() < COUNT_LEN + CRC_LEN {
        return Err(malformed());
    }
    let body = &raw[..raw.len() - CRC_LEN];
    let word = u32_at(&body[..COUNT_LEN]);
    let count = (word & COUNT_MASK) as usize;
    let joins = Joins {
        first_continues: word & FIRST_CONTINUES != 0,
        last_continues: word & LAST_CONTINUES != 0,
    };
    let rest = &body[COUNT_LEN..];
    if word & REFS != 0 {
        // Records of a reference row are whole.
        if count == 0 || joins != Joins::default() || rest.len() != SEGMENT_LEN + REF_LEN * count {
            return Err(malformed());
        }
        let (segment, refs) = rest.split_at(SEGMENT_LEN);
        let mut total = 0u64;
        for r in refs.chunks_exact(REF_LEN) {
            let len = u32_at(&r[8..]);
            if len == 0 || u64_at(&r[..8]).checked_add(u64::from(len)).is_none() {
                return Err(malformed());
            }
            total += u64::from(len);
        }
        return Ok(Row {
            body: Body::Refs {
                segment: u64_at(segment),
                refs,
            },
            data_len: total,
            joins,
        });
    }
    if count == 0 || count > rest.len() / LEN_LEN {
        return Err(malformed());
    }
    let (lens, data) = rest.split_at(LEN_LEN * count);
    let mut total = 0u64;
    for len in lens.chunks_exact(LEN_LEN) {
        let len = u32_at(len);
        if len == 0 {
            return Err(malformed());
        }
        total += u64::from(len);
    }
    if total != data.len() as u64 {
        return Err(malformed());
    }
    Ok(Row {
        body: Body::Inline { lens, data },
        data_len: total,
        joins,
    })
}

/// [`parse_row`], then the checksum: the row whose bytes are about to be served.
pub(super) fn read_row(id: StreamId, start: u64, raw: &[u8]) -> Result<Row<'_>, StorageError> {
    let row = parse_row(id, start, raw)?;
    let (body, crc) = raw.split_at(raw.len() - CRC_LEN);
    if u32_at(crc) != row_crc(id, start, body) {
        return Err(StorageError::Corrupt {
            what: format!("record row of stream {id} at {start}"),
            detail: "checksum mismatch".into(),
        });
    }
    Ok(row)
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn unseal(raw: &[u8]) -> Option<&[u8]> {
    if raw.len() < CRC_LEN {
        return None;
    }
    let (body, crc) = raw.split_at(raw.len() - CRC_LEN);
    let mut b = [0u8; CRC_LEN];
    b.copy_from_slice(crc);
    (u32::from_le_bytes(b) == crc32c::crc32c(body)).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine (and, between checkpoints, the flusher) keeps one per stream written.
    #[test]
    fn a_state_row_is_64_bytes() {
        assert_eq!(std::mem::size_of::<StateRow>(), 64);
    }

    #[test]
    fn state_row_round_trips_and_refuses_damage() {
        let row = StateRow {
            tail: 42,
            released: 2,
            last_access_ms: 7,
            lsn: 0,
            closed: true,
            soft_deleted: true,
            closed_by: Some(Box::new(ProducerTuple {
                id: "p-1".into(),
                epoch: 3,
                seq: 9,
            })),
            last_seq: Some("0007".into()),
        };
        let mut raw = row.encode();
        assert_eq!(StateRow::decode(1, &raw).unwrap(), row);
        let plain = StateRow::default();
        assert_eq!(StateRow::decode(1, &plain.encode()).unwrap(), plain);
        raw[5] ^= 1;
        assert!(matches!(
            StateRow::decode(1, &raw),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(StateRow::decode(1, &[]).is_err());
    }

    #[test]
    fn a_version_1_state_row_reads_with_its_log_start_as_the_retained_start() {
        // A version 1 row: no `released` field after the access time.
        let mut v1 = vec![1u8, CLOSED];
        v1.extend_from_slice(&50u64.to_le_bytes());
        v1.extend_from_slice(&30u64.to_le_bytes());
        v1.extend_from_slice(&9u64.to_le_bytes());
        v1.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let row = StateRow::decode(1, &v1).unwrap();
        assert_eq!(
            (row.tail, row.own_bytes(), row.released, row.closed),
            (50, 30, 20, true)
        );
        assert_eq!(row.encode()[0], STATE_VERSION);
    }

    fn row(id: StreamId, start: u64, records: &[&[u8]]) -> Vec<u8> {
        let mut raw = vec![0u8; row_value_len(records)];
        write_row(&mut raw, id, start, records, Joins::default());
        raw
    }

    #[test]
    fn a_row_round_trips_its_records() {
        let raw = row(5, 10, &[b"abc", b"d", b"efgh"]);
        assert_eq!(raw.len(), 4 + 3 * 4 + 8 + 4);
        let parsed = read_row(5, 10, &raw).unwrap();
        assert_eq!(parsed.data_len(), 8);
        let records: Vec<Entry<'_>> = parsed.entries().collect();
        assert_eq!(
            records,
            [
                Entry::Inline(b"abc"),
                Entry::Inline(b"d"),
                Entry::Inline(b"efgh")
            ]
        );
        assert_eq!(parsed.data(), Some(b"abcdefgh".as_slice()));
        let one = row(1, 0, &[b"x"]);
        assert_eq!(read_row(1, 0, &one).unwrap().entries().count(), 1);
    }

    #[test]
    fn a_reference_row_round_trips_and_is_checked() {
        let refs = [(8u64, 100u32), (200, 5), (4096, 65536)];
        let mut raw = vec![0u8; ref_row_value_len(refs.len())];
        write_ref_row(&mut raw, 5, 10, 7, &refs);
        assert_eq!(raw.len(), 4 + 8 + 3 * 12 + 4);
        let parsed = read_row(5, 10, &raw).unwrap();
        assert_eq!(parsed.data_len(), 100 + 5 + 65536);
        assert_eq!(parsed.segment(), Some(7));
        assert_eq!(parsed.data(), None);
        assert_eq!(parsed.joins(), Joins::default());
        let entries: Vec<Entry<'_>> = parsed.entries().collect();
        assert_eq!(
            entries[2],
            Entry::At {
                segment: 7,
                offset: 4096,
                len: 65536
            }
        );
        assert!(read_row(5, 11, &raw).is_err(), "the key is checked");
        let malformed = |raw: &[u8]| {
            matches!(
                parse_row(5, 10, raw),
                Err(StorageError::Corrupt { detail, .. }) if detail.contains("malformed")
            )
        };
        // A reference of length 0; a count larger than the references present; a split flag.
        let mut bad = raw.clone();
        bad[4 + 8 + 12 + 8..4 + 8 + 12 + 12].copy_from_slice(&0u32.to_le_bytes());
        assert!(malformed(&bad));
        let mut bad = raw.clone();
        bad[0] = 4;
        assert!(malformed(&bad));
        let mut bad = raw.clone();
        bad[3] |= 0x80;
        assert!(malformed(&bad));
    }

    #[test]
    fn a_row_checksum_covers_key_and_data() {
        let mut raw = row(5, 10, &[b"abc", b"de"]);
        assert!(read_row(5, 10, &raw).is_ok());
        assert!(read_row(5, 11, &raw).is_err());
        assert!(read_row(6, 10, &raw).is_err());
        // Structure is intact, so only the checksum can tell.
        let last = raw.len() - 5;
        raw[last] ^= 0x40;
        assert!(parse_row(5, 10, &raw).is_ok());
        assert!(matches!(
            read_row(5, 10, &raw),
            Err(StorageError::Corrupt { detail, .. }) if detail.contains("checksum")
        ));
    }

    #[test]
    fn a_malformed_row_is_refused_before_its_lengths_are_used() {
        let good = row(5, 10, &[b"abc", b"de"]);
        let malformed = |raw: &[u8]| {
            matches!(
                parse_row(5, 10, raw),
                Err(StorageError::Corrupt { detail, .. }) if detail.contains("malformed")
            )
        };
        assert!(malformed(&[]));
        assert!(malformed(&good[..6]));
        // A count larger than the lengths present.
        let mut raw = good.clone();
        raw[0] = 200;
        assert!(malformed(&raw));
        // A count of zero.
        raw[0] = 0;
        assert!(malformed(&raw));
        // A length that runs past the data.
        let mut raw = good.clone();
        raw[4] = 9;
        assert!(malformed(&raw));
        // An empty record.
        let mut raw = good.clone();
        raw[4] = 0;
        assert!(malformed(&raw));
        // Bytes beyond what the lengths account for.
        let mut raw = good.clone();
        raw.insert(good.len() - 4, b'z');
        assert!(malformed(&raw));
    }
}
