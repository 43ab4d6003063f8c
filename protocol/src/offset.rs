//! Offsets: `{seq:016}_{pos:016}`, fixed width so that string order is numeric order.
//!
//! `seq` is reserved for segment rotation and is 0 today; `pos` is the byte position in the
//! stream's logical data. The sentinels `-1` (start) and `now` (tail) are only ever *requests*;
//! the server never emits them.

use std::fmt;
use std::str::FromStr;

/// The largest value one half of an offset may take: 16 decimal digits, so the fixed-width form
/// never grows and string comparison stays numeric comparison.
pub const MAX_PART: u64 = 9_999_999_999_999_999;

/// A concrete position in a stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    /// Segment number; reserved, always 0 for now.
    pub seq: u64,
    /// Byte position in the stream's logical data.
    pub pos: u64,
}

impl Offset {
    /// The start of every stream.
    pub const ZERO: Offset = Offset { seq: 0, pos: 0 };

    /// An offset at byte position `pos` of the current segment.
    pub const fn at(pos: u64) -> Self {
        Offset { seq: 0, pos }
    }
}

impl Offset {
    /// The wire form, formatted without allocating (offsets go into a header of every response).
    pub fn encode(&self) -> OffsetText {
        let mut text = OffsetText {
            buf: [0; OffsetText::CAPACITY],
            len: 0,
        };
        text.push_part(self.seq);
        text.buf[text.len] = b'_';
        text.len += 1;
        text.push_part(self.pos);
        text
    }
}

/// An offset's wire form on the stack: `{seq:016}_{pos:016}` (wider only past [`MAX_PART`],
/// which parsing refuses and the server never reaches).
#[derive(Clone, Copy)]
pub struct OffsetText {
    buf: [u8; OffsetText::CAPACITY],
    len: usize,
}

impl OffsetText {
    /// Two parts of up to 20 digits (`u64::MAX`) and the separator.
    const CAPACITY: usize = 41;

    fn push_part(&mut self, mut n: u64) {
        let mut digits = [b'0'; 20];
        let mut i = digits.len();
        while n > 0 {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        // At least 16 digits, zero-padded.
        let first = i.min(digits.len() - 16);
        let part = &digits[first..];
        self.buf[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and '_' are ever written.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode().as_str())
    }
}

/// Why an offset string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffsetParseError {
    #[error("offset is empty")]
    Empty,
    #[error("offset must be -1, now, or two groups of digits joined by '_'")]
    Malformed,
    #[error("offset part exceeds {MAX_PART}")]
    OutOfRange,
}

fn parse_part(part: &str) -> Result<u64, OffsetParseError> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OffsetParseError::Malformed);
    }
    // All digits: the only failure left is overflow.
    let value: u64 = part.parse().map_err(|_| OffsetParseError::OutOfRange)?;
    if value > MAX_PART {
        return Err(OffsetParseError::OutOfRange);
    }
    Ok(value)
}

impl FromStr for Offset {
    type Err = OffsetParseError;

    /// Parses `^\d+_\d+$` structurally (never by string comparison), each part at most
    /// [`MAX_PART`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(OffsetParseError::Empty);
        }
        let (seq, pos) = s.split_once('_').ok_or(OffsetParseError::Malformed)?;
        Ok(Offset {
            seq: parse_part(seq)?,
            pos: parse_part(pos)?,
        })
    }
}

/// The `offset` a reader asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOffset {
    /// `-1`, or no offset at all: the start of the stream.
    Start,
    /// `now`: the tail at the time the request is processed.
    Now,
    /// A concrete offset previously handed out by the server.
    At(Offset),
}

impl FromStr for ReadOffset {
    type Err = OffsetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "-1" => Ok(ReadOffset::Start),
            "now" => Ok(ReadOffset::Now),
            other => other.parse().map(ReadOffset::At),
        }
    }
}

impl fmt::Display for ReadOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadOffset::Start => f.write_str("-1"),
            ReadOffset::Now => f.write_str("now"),
            ReadOffset::At(o) => o.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_fixed_width_formatting() {
        for (seq, pos) in [
            (0, 0),
            (0, 7),
            (3, 1_234_567_890),
            (MAX_PART, MAX_PART),
            (0, MAX_PART + 1),
            (u64::MAX, u64::MAX),
        ] {
            let o = Offset { seq, pos };
            assert_eq!(o.encode().as_str(), format!("{seq:016}_{pos:016}"));
            assert_eq!(o.to_string(), format!("{seq:016}_{pos:016}"));
        }
    }
    use proptest::prelude::*;

    #[test]
    fn formats_fixed_width() {
        assert_eq!(
            Offset::at(42).to_string(),
            "0000000000000000_0000000000000042"
        );
        assert_eq!(
            Offset::ZERO.to_string(),
            "0000000000000000_0000000000000000"
        );
    }

    #[test]
    fn parses_sentinels_and_concrete() {
        assert_eq!("-1".parse(), Ok(ReadOffset::Start));
        assert_eq!("now".parse(), Ok(ReadOffset::Now));
        assert_eq!("1_2".parse(), Ok(ReadOffset::At(Offset { seq: 1, pos: 2 })));
        assert_eq!(
            "9999999999999999_9999999999999999".parse::<Offset>(),
            Ok(Offset {
                seq: MAX_PART,
                pos: MAX_PART
            })
        );
    }

    #[test]
    fn rejects_hostile_offsets() {
        for bad in [
            "", "_", "1_", "_1", "0,1", "0 1", "../x", "x/..", "0\0", "0_0\n", "0_0\r\n", "/",
            "-2", "NOW", "+1_0", "1_-0", "1_2_3", "0x1_0", "١_٢",
        ] {
            assert!(bad.parse::<ReadOffset>().is_err(), "accepted {bad:?}");
        }
        assert_eq!(
            "99999999999999999_0".parse::<Offset>(),
            Err(OffsetParseError::OutOfRange)
        );
        assert_eq!(
            "0_99999999999999999999999".parse::<Offset>(),
            Err(OffsetParseError::OutOfRange)
        );
    }

    proptest! {
        #[test]
        fn string_order_is_numeric_order(a in 0..=MAX_PART, b in 0..=MAX_PART, c in 0..=MAX_PART, d in 0..=MAX_PART) {
            let x = Offset { seq: a, pos: b };
            let y = Offset { seq: c, pos: d };
            prop_assert_eq!(x.cmp(&y), x.to_string().cmp(&y.to_string()));
        }

        #[test]
        fn round_trips(seq in 0..=MAX_PART, pos in 0..=MAX_PART) {
            let o = Offset { seq, pos };
            prop_assert_eq!(o.to_string().parse::<Offset>(), Ok(o));
        }

        #[test]
        fn any_string_parses_or_errors_without_panic(s in ".*") {
            let _ = s.parse::<ReadOffset>();
        }
    }
}
