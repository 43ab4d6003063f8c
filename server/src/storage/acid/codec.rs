//! Byte encodings of the values the `acid` tables hold. Every value ends in a CRC-32C so that a
//! flipped bit on disk is refused loudly instead of served; redb checksums its pages too, but only
//! verifies them when it repairs a file after a crash.

use super::super::{ProducerTuple, StorageError, StreamId, StreamMeta};
use serde::{Deserialize, Serialize};

/// Version byte that starts every state row.
const STATE_VERSION: u8 = 1;
/// Version of the `streams` table's JSON.
const META_VERSION: u32 = 1;

const CLOSED: u8 = 1;
const SOFT_DELETED: u8 = 2;

const CRC_LEN: usize = 4;

/// The small per-stream row rewritten (once per write transaction) when a stream changes. It
/// holds only fixed-size fields and the two short strings, never anything that grows with the
/// stream or with its producers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct StateRow {
    pub tail: u64,
    pub own_bytes: u64,
    pub last_access_ms: u64,
    pub closed: bool,
    pub soft_deleted: bool,
    pub closed_by: Option<ProducerTuple>,
    pub last_seq: Option<String>,
}

impl StateRow {
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
        out.extend_from_slice(&self.own_bytes.to_le_bytes());
        out.extend_from_slice(&self.last_access_ms.to_le_bytes());
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
        if r.u8()? != STATE_VERSION {
            return Err(corrupt("unknown version"));
        }
        let flags = r.u8()?;
        let mut row = StateRow {
            tail: r.u64()?,
            own_bytes: r.u64()?,
            last_access_ms: r.u64()?,
            closed: flags & CLOSED != 0,
            soft_deleted: flags & SOFT_DELETED != 0,
            closed_by: None,
            last_seq: None,
        };
        if r.u8()? == 1 {
            row.last_seq = Some(r.string()?);
        }
        if r.u8()? == 1 {
            row.closed_by = Some(ProducerTuple {
                id: r.string()?,
                epoch: r.u64()?,
                seq: r.u64()?,
            });
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

/// Length of a record value holding `data_len` bytes of data.
pub(super) fn record_value_len(data_len: usize) -> usize {
    data_len + CRC_LEN
}

/// The checksum of a record covers its key too, so a record found under the wrong stream or
/// position is refused like a damaged one.
pub(super) fn record_crc(id: StreamId, start: u64, data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&id.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &start.to_le_bytes());
    crc32c::crc32c_append(crc, data)
}

/// Writes a record value (`data` then its checksum) into `out`, which is exactly
/// [`record_value_len`] long.
pub(super) fn write_record(out: &mut [u8], id: StreamId, start: u64, data: &[u8]) {
    let (body, crc) = out.split_at_mut(data.len());
    body.copy_from_slice(data);
    crc.copy_from_slice(&record_crc(id, start, data).to_le_bytes());
}

/// The data of a record value, after checking its checksum.
pub(super) fn read_record(id: StreamId, start: u64, raw: &[u8]) -> Result<&[u8], StorageError> {
    let ok = raw.len() >= CRC_LEN && {
        let (data, crc) = raw.split_at(raw.len() - CRC_LEN);
        let mut b = [0u8; CRC_LEN];
        b.copy_from_slice(crc);
        u32::from_le_bytes(b) == record_crc(id, start, data)
    };
    if !ok {
        return Err(StorageError::Corrupt {
            what: format!("record of stream {id} at {start}"),
            detail: "checksum mismatch".into(),
        });
    }
    Ok(&raw[..raw.len() - CRC_LEN])
}

/// Data length of a record value, without checking it (for planning reads and recovery checks;
/// the bytes are checked when they are served).
pub(super) fn record_data_len(raw_len: usize) -> usize {
    raw_len.saturating_sub(CRC_LEN)
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

    #[test]
    fn state_row_round_trips_and_refuses_damage() {
        let row = StateRow {
            tail: 42,
            own_bytes: 40,
            last_access_ms: 7,
            closed: true,
            soft_deleted: true,
            closed_by: Some(ProducerTuple {
                id: "p-1".into(),
                epoch: 3,
                seq: 9,
            }),
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
    fn record_checksum_covers_key_and_data() {
        let mut raw = vec![0u8; record_value_len(3)];
        write_record(&mut raw, 5, 10, b"abc");
        assert_eq!(read_record(5, 10, &raw).unwrap(), b"abc");
        assert!(read_record(5, 11, &raw).is_err());
        assert!(read_record(6, 10, &raw).is_err());
        raw[1] ^= 0x40;
        assert!(read_record(5, 10, &raw).is_err());
    }
}
