//! JSON mode: validation and one-level array flattening (spec 9.1).
//!
//! Messages are stored as their exact source text (no re-serialisation, so number formatting and
//! key order survive), joined by commas; a read wraps the joined records in `[` `]`.

use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;

/// Why a JSON body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("body is not valid UTF-8 (JSON streams take UTF-8 JSON)")]
    NotUtf8,
    #[error("body is not valid JSON: {0}")]
    Invalid(String),
    #[error("JSON nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("an empty JSON array appends nothing; send at least one message")]
    EmptyArray,
}

/// Deepest nesting of arrays and objects accepted in a message.
pub const MAX_DEPTH: usize = 64;

/// The nesting depth of a JSON text, ignoring brackets inside strings. Runs before parsing so
/// that hostile nesting is refused cheaply and never recursed into.
fn depth(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Messages of one append, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Messages {
    /// The messages' source texts joined by `,` (empty when there are none).
    pub joined: Bytes,
    pub count: usize,
}

/// Validates `body` and flattens one level of a top-level array. `[]` is refused unless
/// `allow_empty` (a PUT may create an empty JSON stream with `[]`).
pub fn flatten(body: &[u8], allow_empty: bool) -> Result<Messages, JsonError> {
    let text = std::str::from_utf8(body).map_err(|_| JsonError::NotUtf8)?;
    // One level more for the batch array that gets flattened.
    if depth(body) > MAX_DEPTH + 1 {
        return Err(JsonError::TooDeep);
    }
    let is_array = text.trim_start().starts_with('[');
    if is_array {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| JsonError::Invalid(e.to_string()))?;
        if items.is_empty() {
            return if allow_empty {
                Ok(Messages {
                    joined: Bytes::new(),
                    count: 0,
                })
            } else {
                Err(JsonError::EmptyArray)
            };
        }
        let len = items.iter().map(|i| i.get().len() + 1).sum::<usize>();
        let mut out = BytesMut::with_capacity(len);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b",");
            }
            out.extend_from_slice(item.get().as_bytes());
        }
        Ok(Messages {
            joined: out.freeze(),
            count: items.len(),
        })
    } else {
        let value: &RawValue =
            serde_json::from_str(text).map_err(|e| JsonError::Invalid(e.to_string()))?;
        Ok(Messages {
            joined: Bytes::copy_from_slice(value.get().as_bytes()),
            count: 1,
        })
    }
}

/// The first `n` messages of a stored record (for fork sub-offsets), or `None` when the record
/// holds fewer than `n`.
pub fn first_messages(record: &[u8], n: usize) -> Option<Bytes> {
    let text = std::str::from_utf8(record).ok()?;
    let wrapped = format!("[{text}]");
    let items: Vec<&RawValue> = serde_json::from_str(&wrapped).ok()?;
    if items.len() < n {
        return None;
    }
    let joined = items[..n]
        .iter()
        .map(|i| i.get())
        .collect::<Vec<_>>()
        .join(",");
    Some(Bytes::from(joined))
}

/// How many messages a stored record holds (0 if it does not parse).
pub fn count_messages(record: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(record) else {
        return 0;
    };
    let wrapped = format!("[{text}]");
    serde_json::from_str::<Vec<&RawValue>>(&wrapped).map_or(0, |v| v.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(body: &str) -> (String, usize) {
        let m = flatten(body.as_bytes(), false).unwrap();
        (String::from_utf8(m.joined.to_vec()).unwrap(), m.count)
    }

    #[test]
    fn flattens_exactly_one_level() {
        assert_eq!(texts(r#"{"a":1}"#), (r#"{"a":1}"#.into(), 1));
        assert_eq!(
            texts(r#"[{"a":1}, {"b":2}]"#),
            (r#"{"a":1},{"b":2}"#.into(), 2)
        );
        assert_eq!(texts("[[1,2],[3,4]]"), ("[1,2],[3,4]".into(), 2));
        assert_eq!(texts("[[[1,2,3]]]"), ("[[1,2,3]]".into(), 1));
        assert_eq!(texts(" 1.50 "), ("1.50".into(), 1));
    }

    #[test]
    fn keeps_number_formatting() {
        assert_eq!(texts("[1.0, 1e3, -0]"), ("1.0,1e3,-0".into(), 3));
    }

    #[test]
    fn empty_array_only_for_put() {
        assert_eq!(flatten(b"[]", false), Err(JsonError::EmptyArray));
        assert_eq!(flatten(b" [ ] ", true).map(|m| m.count), Ok(0));
    }

    #[test]
    fn rejects_invalid_json_and_invalid_utf8() {
        assert!(matches!(flatten(b"{", false), Err(JsonError::Invalid(_))));
        assert!(matches!(
            flatten(b"[1,]", false),
            Err(JsonError::Invalid(_))
        ));
        assert!(matches!(flatten(b"1 2", false), Err(JsonError::Invalid(_))));
        assert!(matches!(flatten(b"", false), Err(JsonError::Invalid(_))));
        assert_eq!(flatten(b"\"\xff\"", false), Err(JsonError::NotUtf8));
    }

    #[test]
    fn unbounded_nesting_is_refused_not_a_stack_overflow() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(flatten(deep.as_bytes(), false), Err(JsonError::TooDeep));
        let ok = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(flatten(ok.as_bytes(), false).is_ok());
        assert!(flatten(br#"["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"["]"#, false).is_ok());
    }

    #[test]
    fn first_messages_takes_a_prefix() {
        assert_eq!(
            first_messages(br#"{"a":1},[2],3"#, 2).as_deref(),
            Some(&br#"{"a":1},[2]"#[..])
        );
        assert_eq!(first_messages(b"1,2", 3), None);
    }
}
