//! Content-type rules: media-type comparison, JSON mode, and SSE text-versus-base64.

/// How the protocol treats a stream's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    /// `application/json`: message boundaries kept, arrays flattened one level, reads are arrays.
    Json,
    /// `text/*`: bytes; SSE carries them as text.
    Text,
    /// Everything else: bytes; SSE carries them base64-encoded.
    Binary,
}

/// The default content type when a PUT names none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The media type of a `Content-Type` value: parameters dropped, trimmed, lowercased.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The media type of a `Content-Type` value, not lowercased: a slice, no allocation.
fn media_slice(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// Whether two content types name the same media type (parameters and case ignored).
pub fn same_media_type(a: &str, b: &str) -> bool {
    // Usually the same text (a client sends its stream's Content-Type with every append): equal
    // values need no parameter split, and trimming is Unicode-aware and not free.
    a.eq_ignore_ascii_case(b) || media_slice(a).eq_ignore_ascii_case(media_slice(b))
}

/// Whether a value has the `type/subtype` shape of a media type.
pub fn is_well_formed(content_type: &str) -> bool {
    match media_slice(content_type).split_once('/') {
        Some((t, s)) => is_token(t) && is_token(s),
        None => false,
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

impl MediaKind {
    pub fn of(content_type: &str) -> MediaKind {
        let media = media_slice(content_type);
        if media.eq_ignore_ascii_case("application/json") {
            MediaKind::Json
        } else if media
            .get(..5)
            .is_some_and(|t| t.eq_ignore_ascii_case("text/"))
        {
            MediaKind::Text
        } else {
            MediaKind::Binary
        }
    }

    /// Whether SSE must base64-encode data events of this kind.
    pub fn sse_base64(self) -> bool {
        self == MediaKind::Binary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_comparison_ignores_case_and_parameters() {
        assert!(same_media_type(
            "APPLICATION/JSON",
            "application/json; charset=utf-8"
        ));
        assert!(!same_media_type("text/plain", "application/json"));
    }

    #[test]
    fn kinds() {
        assert_eq!(
            MediaKind::of("application/json; charset=utf-8"),
            MediaKind::Json
        );
        assert_eq!(MediaKind::of("Text/Plain"), MediaKind::Text);
        assert_eq!(MediaKind::of("application/ndjson"), MediaKind::Binary);
        assert_eq!(MediaKind::of(" TEXT/csv ;x=y"), MediaKind::Text);
        assert_eq!(MediaKind::of("tex"), MediaKind::Binary);
        assert_eq!(MediaKind::of("täxt/plain"), MediaKind::Binary);
        assert!(MediaKind::Binary.sse_base64());
        assert!(!MediaKind::Text.sse_base64());
    }

    #[test]
    fn well_formedness() {
        assert!(is_well_formed("text/plain"));
        assert!(is_well_formed("application/vnd.api+json; charset=utf-8"));
        assert!(!is_well_formed("garbage"));
        assert!(!is_well_formed("/json"));
        assert!(!is_well_formed(""));
    }
}
