//! The SSE `control` event (spec 5.8) and the framing rules shared by server and clients.

use serde::{Deserialize, Serialize};

/// The JSON payload of an `event: control`. Field names are camelCase on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlEvent {
    /// The offset after the data sent so far; where a client resumes.
    pub stream_next_offset: String,
    /// Present while the stream is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_cursor: Option<String>,
    /// True when the reader has everything the stream held when the event was generated.
    #[serde(default, skip_serializing_if = "is_false")]
    pub up_to_date: bool,
    /// True when the stream is closed and all its data has been sent: end of stream.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream_closed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `event: data` and `event: control`, as sent on the wire.
pub const EVENT_DATA: &str = "data";
pub const EVENT_CONTROL: &str = "control";

/// Splits an SSE payload into lines on CRLF, CR and LF, so that no payload byte can end a
/// `data:` line early and forge an event.
pub fn split_lines(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(payload);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.iter().position(|&b| b == b'\r' || b == b'\n') {
            None => {
                rest = None;
                Some(current)
            }
            Some(i) => {
                let skip = if current[i] == b'\r' && current.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&current[i + skip..]);
                Some(&current[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_serialises_camel_case_and_omits_defaults() {
        let c = ControlEvent {
            stream_next_offset: "0000000000000000_0000000000000005".into(),
            stream_cursor: Some("7".into()),
            up_to_date: true,
            stream_closed: false,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap_or_default(),
            r#"{"streamNextOffset":"0000000000000000_0000000000000005","streamCursor":"7","upToDate":true}"#
        );
    }

    #[test]
    fn splits_on_every_line_ending() {
        let lines: Vec<&[u8]> = split_lines(b"a\r\nb\rc\nd").collect();
        assert_eq!(lines, vec![&b"a"[..], b"b", b"c", b"d"]);
        let lines: Vec<&[u8]> = split_lines(b"x\n").collect();
        assert_eq!(lines, vec![&b"x"[..], b""]);
        let lines: Vec<&[u8]> = split_lines(b"").collect();
        assert_eq!(lines, vec![&b""[..]]);
    }
}
