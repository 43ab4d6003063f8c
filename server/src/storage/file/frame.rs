//! The on-disk record codec of the file modes (see `server/STORAGE.md`).
//!
//! ```text
//! segment  := header batch*              (version 1: header frame*)
//! header   := "DSWAL\0\0\0" (8 bytes) | version u32 LE | reserved u32 LE (0)
//! batch    := frame(BATCH: seq u64 LE | len u32 LE | durable segment u32 LE | durable offset u64 LE)
//!             frame*                   the frames fill `len` bytes
//! frame    := len u32 LE | crc32c u32 LE | kind u8 | payload[len]
//!             crc32c covers kind and payload
//! ```
//! Everything one protocol operation changes is one frame, so a frame is the unit of
//! atomicity: after a crash it is either whole (checksum matches) or it is a torn tail. A
//! batch is what the writer wrote (and, in `file-durable`, synced) at once: the unit a power
//! loss can tear, and so the unit recovery keeps or drops whole.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::{AppendEntry, ProducerState, ProducerTuple, StreamId, StreamMeta};

pub const MAGIC: &[u8; 8] = b"DSWAL\0\0\0";
/// The version this build writes: 3 adds the RELEASE and STATE frames (retention). Version 1
/// segments (frames without batch headers) and version 2 segments are still read; a build that
/// reads only up to 2 refuses a version 3 segment by its version number.
pub const VERSION: u32 = 3;
/// The oldest version this build reads.
pub const OLDEST_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// `len` + `crc` + `kind`.
pub const FRAME_HEADER_LEN: usize = 9;
/// Largest payload accepted when decoding; anything larger is corruption, not data.
pub const MAX_PAYLOAD: u32 = 1 << 30;

pub const KIND_CREATE: u8 = 1;
pub const KIND_APPEND: u8 = 2;
pub const KIND_SOFT_DELETE: u8 = 3;
pub const KIND_REMOVE: u8 = 4;
pub const KIND_BATCH: u8 = 5;
/// A stream's data before a position is released (version 3).
pub const KIND_RELEASE: u8 = 6;
/// A stream's whole state, written forward so that older segments can be deleted (version 3).
pub const KIND_STATE: u8 = 7;
/// A BATCH frame's total length: header, sequence number, byte count and durable mark.
pub const BATCH_FRAME_LEN: usize = FRAME_HEADER_LEN + 24;

pub fn segment_header() -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// The JSON part of a CREATE frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateMeta {
    pub meta: StreamMeta,
    /// Created closed (`Stream-Closed: true` on PUT).
    pub closed: bool,
}

/// The JSON part of an APPEND frame: writer-state changes committed with the data.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppendState {
    /// This append closes the stream. (Not an `Option<Option<_>>`: serde would read a closing
    /// append without a producer, `Some(None)`, back as `None`.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closes: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<ProducerTuple>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<(String, ProducerState)>,
}

/// The JSON part of a STATE frame: everything recovery needs to know about a stream that the
/// frames before this one said (its CREATE frame included), so that those frames' segments can
/// be deleted. The frame may also carry retained records moved out of the segment being freed
/// (starting at `moved_from`); the stream's other retained records stay in their own frames.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamState {
    pub meta: StreamMeta,
    pub tail: u64,
    pub released: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<ProducerTuple>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub producers: Vec<(String, ProducerState)>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub soft_deleted: bool,
    /// Position of the first record this frame carries (meaningless when it carries none).
    #[serde(default)]
    pub moved_from: u64,
}

impl AppendState {
    fn is_empty(&self) -> bool {
        !self.closes && self.stream_seq.is_none() && self.producer.is_none()
    }
}

/// An encoded frame and where its data records sit inside it.
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// `(offset within the frame, length)` of each data record, in order.
    pub records: Vec<(usize, usize)>,
}

fn frame(kind: u8, payload_len: usize, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + payload_len);
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(kind);
    write(&mut buf);
    let len = (buf.len() - FRAME_HEADER_LEN) as u32;
    let crc = crc32c::crc32c(&buf[8..]);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

pub fn encode_create(meta: &CreateMeta, initial: &[Bytes]) -> Encoded {
    let json = serde_json::to_vec(meta).unwrap_or_default();
    encode_with_records(KIND_CREATE, meta.meta.id, &json, initial)
}

/// The layout CREATE and STATE share: stream id, the JSON's length and bytes, the number of
/// records, then each record's length and bytes.
fn encode_with_records(kind: u8, id: StreamId, json: &[u8], data: &[Bytes]) -> Encoded {
    let data_len: usize = data.iter().map(|d| d.len() + 4).sum();
    let mut records = Vec::with_capacity(data.len());
    let bytes = frame(kind, 16 + json.len() + data_len, |b| {
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(json);
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        for d in data {
            b.extend_from_slice(&(d.len() as u32).to_le_bytes());
            records.push((b.len(), d.len()));
            b.extend_from_slice(d);
        }
    });
    Encoded { bytes, records }
}

pub fn encode_append(id: StreamId, entry: &AppendEntry) -> Encoded {
    let state = AppendState {
        closes: entry.close.is_some(),
        closed_by: entry.close.clone().flatten(),
        stream_seq: entry.stream_seq.clone(),
        producer: entry.producer.clone(),
    };
    let json = if state.is_empty() {
        Vec::new()
    } else {
        serde_json::to_vec(&state).unwrap_or_default()
    };
    let data = entry.data.as_deref().unwrap_or_default();
    let mut records = Vec::new();
    let bytes = frame(KIND_APPEND, 20 + json.len() + data.len(), |b| {
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&entry.start.to_le_bytes());
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(&json);
        if !data.is_empty() {
            records.push((b.len(), data.len()));
            b.extend_from_slice(data);
        }
    });
    Encoded { bytes, records }
}

pub fn encode_marker(kind: u8, id: StreamId) -> Encoded {
    Encoded {
        bytes: frame(kind, 8, |b| b.extend_from_slice(&id.to_le_bytes())),
        records: Vec::new(),
    }
}

/// RELEASE: stream `id`'s data before `before` is gone.
pub fn encode_release(id: StreamId, before: u64) -> Encoded {
    Encoded {
        bytes: frame(KIND_RELEASE, 16, |b| {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&before.to_le_bytes());
        }),
        records: Vec::new(),
    }
}

/// STATE: a stream's whole state as of this point of the log, and the consecutive retained
/// records `moved` (from `state.moved_from`) rewritten here so that their old segment can go.
pub fn encode_state(state: &StreamState, moved: &[Bytes]) -> Encoded {
    let json = serde_json::to_vec(state).unwrap_or_default();
    encode_with_records(KIND_STATE, state.meta.id, &json, moved)
}

/// A position in the log: segment id, then byte offset in that segment. Ordered as the log is.
pub type LogPos = (u32, u64);

/// The frame that opens a batch: its sequence number (one more than the previous batch's), the
/// bytes of the frames that follow it in the batch, and its durable mark: every byte of the log
/// before that position had been synced when this batch was written.
pub fn encode_batch(seq: u64, len: u32, durable: LogPos) -> [u8; BATCH_FRAME_LEN] {
    let mut out = [0u8; BATCH_FRAME_LEN];
    out[8] = KIND_BATCH;
    out[9..17].copy_from_slice(&seq.to_le_bytes());
    out[17..21].copy_from_slice(&len.to_le_bytes());
    out[21..25].copy_from_slice(&durable.0.to_le_bytes());
    out[25..33].copy_from_slice(&durable.1.to_le_bytes());
    let crc = crc32c::crc32c(&out[8..]);
    out[0..4].copy_from_slice(&24u32.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A decoded frame. Data records are given as `(offset within the payload, length)`.
#[derive(Debug)]
pub enum Decoded {
    Create {
        meta: Box<CreateMeta>,
        records: Vec<(usize, usize)>,
    },
    Append {
        id: StreamId,
        start: u64,
        state: AppendState,
        data: Option<(usize, usize)>,
    },
    SoftDelete(StreamId),
    Remove(StreamId),
    Release {
        id: StreamId,
        before: u64,
    },
    State {
        state: Box<StreamState>,
        /// Moved records, from `state.moved_from` on.
        records: Vec<(usize, usize)>,
    },
    /// Opens a batch of `len` bytes of frames; the log before `durable` was synced.
    Batch {
        seq: u64,
        len: u32,
        durable: LogPos,
    },
}

/// Why a frame did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header or the declared length: a torn write, if at the tail.
    Truncated,
    /// The checksum does not match or the payload does not parse.
    Bad(String),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| FrameError::Bad("field runs past the frame".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes the frame at the start of `buf`: the frame and its total length.
pub fn decode(buf: &[u8]) -> Result<(Decoded, usize), FrameError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_PAYLOAD {
        return Err(FrameError::Bad(format!(
            "frame length {len} is implausible"
        )));
    }
    let total = FRAME_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Err(FrameError::Truncated);
    }
    if crc32c::crc32c(&buf[8..total]) != crc {
        return Err(FrameError::Bad("checksum mismatch".into()));
    }
    let kind = buf[8];
    let payload = &buf[FRAME_HEADER_LEN..total];
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let decoded = match kind {
        KIND_CREATE => {
            let _id = r.u64()?;
            let json_len = r.u32()? as usize;
            let meta: CreateMeta = serde_json::from_slice(r.take(json_len)?)
                .map_err(|e| FrameError::Bad(format!("create metadata: {e}")))?;
            let n = r.u32()? as usize;
            let mut records = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let l = r.u32()? as usize;
                let at = r.pos;
                r.take(l)?;
                records.push((at, l));
            }
            Decoded::Create {
                meta: Box::new(meta),
                records,
            }
        }
        KIND_APPEND => {
            let id = r.u64()?;
            let start = r.u64()?;
            let json_len = r.u32()? as usize;
            let json = r.take(json_len)?;
            let state = if json.is_empty() {
                AppendState::default()
            } else {
                serde_json::from_slice(json)
                    .map_err(|e| FrameError::Bad(format!("append state: {e}")))?
            };
            let at = r.pos;
            let l = payload.len() - at;
            Decoded::Append {
                id,
                start,
                state,
                data: (l > 0).then_some((at, l)),
            }
        }
        KIND_SOFT_DELETE => Decoded::SoftDelete(r.u64()?),
        KIND_REMOVE => Decoded::Remove(r.u64()?),
        KIND_RELEASE => Decoded::Release {
            id: r.u64()?,
            before: r.u64()?,
        },
        KIND_STATE => {
            let id = r.u64()?;
            let json_len = r.u32()? as usize;
            let state: StreamState = serde_json::from_slice(r.take(json_len)?)
                .map_err(|e| FrameError::Bad(format!("stream state: {e}")))?;
            if state.meta.id != id {
                return Err(FrameError::Bad(format!(
                    "state frame of stream {id} holds stream {}",
                    state.meta.id
                )));
            }
            let n = r.u32()? as usize;
            let mut records = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let l = r.u32()? as usize;
                let at = r.pos;
                r.take(l)?;
                records.push((at, l));
            }
            Decoded::State {
                state: Box::new(state),
                records,
            }
        }
        KIND_BATCH => Decoded::Batch {
            seq: r.u64()?,
            len: r.u32()?,
            durable: (r.u32()?, r.u64()?),
        },
        other => return Err(FrameError::Bad(format!("unknown frame kind {other}"))),
    };
    Ok((decoded, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CreateMeta {
        CreateMeta {
            meta: StreamMeta::new(7, "/s", "text/plain", Some(5), 1),
            closed: false,
        }
    }

    #[test]
    fn create_round_trips_with_initial_records() {
        let e = encode_create(
            &meta(),
            &[Bytes::from_static(b"ab"), Bytes::from_static(b"cde")],
        );
        let (d, n) = decode(&e.bytes).unwrap();
        assert_eq!(n, e.bytes.len());
        let Decoded::Create { meta: m, records } = d else {
            panic!("not a create")
        };
        assert_eq!(m.meta.id, 7);
        let payload = &e.bytes[FRAME_HEADER_LEN..];
        let texts: Vec<&[u8]> = records.iter().map(|(o, l)| &payload[*o..*o + *l]).collect();
        assert_eq!(texts, vec![&b"ab"[..], b"cde"]);
        // The encoder's offsets are frame-relative, the decoder's payload-relative.
        assert_eq!(e.records[0].0, records[0].0 + FRAME_HEADER_LEN);
    }

    #[test]
    fn append_round_trips_state_and_data() {
        let entry = AppendEntry {
            start: 10,
            data: Some(Bytes::from_static(b"xyz")),
            close: Some(Some(ProducerTuple {
                id: "p".into(),
                epoch: 1,
                seq: 2,
            })),
            stream_seq: Some("s1".into()),
            producer: Some((
                "p".into(),
                ProducerState {
                    epoch: 1,
                    last_seq: 2,
                    last_ms: 0,
                },
            )),
        };
        let e = encode_append(3, &entry);
        let (d, _) = decode(&e.bytes).unwrap();
        let Decoded::Append {
            id,
            start,
            state,
            data,
        } = d
        else {
            panic!("not an append")
        };
        assert_eq!((id, start), (3, 10));
        assert_eq!(state.stream_seq.as_deref(), Some("s1"));
        assert!(state.closes);
        assert_eq!(state.closed_by.map(|c| c.seq), Some(2));
        let (o, l) = data.unwrap();
        assert_eq!(
            &e.bytes[FRAME_HEADER_LEN + o..FRAME_HEADER_LEN + o + l],
            b"xyz"
        );
    }

    #[test]
    fn a_close_without_a_producer_round_trips() {
        let entry = AppendEntry {
            start: 4,
            close: Some(None),
            ..AppendEntry::default()
        };
        let e = encode_append(1, &entry);
        let Ok((Decoded::Append { state, data, .. }, _)) = decode(&e.bytes) else {
            panic!("not an append")
        };
        assert!(state.closes, "the close must survive encoding");
        assert_eq!(state.closed_by, None);
        assert_eq!(data, None);
    }

    #[test]
    fn a_batch_header_round_trips() {
        let b = encode_batch(u64::MAX - 1, 4096, (7, 1 << 40));
        let (d, n) = decode(&b).unwrap();
        assert_eq!(n, BATCH_FRAME_LEN);
        assert!(
            matches!(d, Decoded::Batch { seq, len: 4096, durable: (7, off) } if seq == u64::MAX - 1 && off == 1 << 40)
        );
        let mut bad = b;
        bad[12] ^= 1;
        assert!(matches!(decode(&bad), Err(FrameError::Bad(_))));
    }

    #[test]
    fn release_and_state_frames_round_trip() {
        let e = encode_release(4, 99);
        assert!(matches!(
            decode(&e.bytes),
            Ok((Decoded::Release { id: 4, before: 99 }, n)) if n == e.bytes.len()
        ));
        let state = StreamState {
            meta: meta().meta,
            tail: 30,
            released: 12,
            closed: true,
            closed_by: None,
            last_seq: Some("a".into()),
            producers: vec![(
                "p".into(),
                ProducerState {
                    epoch: 2,
                    last_seq: 5,
                    last_ms: 1_700_000_000_000,
                },
            )],
            soft_deleted: false,
            moved_from: 12,
        };
        let moved = [Bytes::from_static(b"abc"), Bytes::from_static(b"de")];
        let e = encode_state(&state, &moved);
        let Ok((
            Decoded::State {
                state: back,
                records,
            },
            n,
        )) = decode(&e.bytes)
        else {
            panic!("not a state frame")
        };
        assert_eq!((*back, n), (state, e.bytes.len()));
        let payload = &e.bytes[FRAME_HEADER_LEN..];
        let texts: Vec<&[u8]> = records.iter().map(|(o, l)| &payload[*o..*o + *l]).collect();
        assert_eq!(texts, vec![&b"abc"[..], b"de"]);
    }

    #[test]
    fn torn_and_corrupt_frames_are_told_apart() {
        let e = encode_marker(KIND_REMOVE, 9);
        assert_eq!(
            decode(&e.bytes[..e.bytes.len() - 1]).unwrap_err(),
            FrameError::Truncated
        );
        assert_eq!(decode(&e.bytes[..3]).unwrap_err(), FrameError::Truncated);
        let mut bad = e.bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(decode(&bad), Err(FrameError::Bad(_))));
        assert!(matches!(decode(&e.bytes), Ok((Decoded::Remove(9), _))));
    }
}
