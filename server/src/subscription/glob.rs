//! Subscription patterns over root-relative stream paths: `*` matches exactly one path segment,
//! `**` zero or more, anything else matches a segment literally.

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern must be relative to the stream root (no leading '/')")]
    Absolute,
    #[error("pattern has an empty, '.' or '..' segment")]
    BadSegment,
    #[error("pattern segment {0:?} mixes '*' with other characters; use '*' or '**' alone")]
    PartialWildcard(String),
    #[error("pattern has more than {MAX_SEGMENTS} segments")]
    TooLong,
}

/// The most segments a pattern may have (a bound on matching work).
pub const MAX_SEGMENTS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Any,
}

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    segments: Vec<Segment>,
}

impl Glob {
    pub fn parse(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.starts_with('/') {
            return Err(GlobError::Absolute);
        }
        let mut segments = Vec::new();
        for seg in pattern.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(GlobError::BadSegment);
            }
            segments.push(match seg {
                "*" => Segment::One,
                "**" => {
                    // Consecutive `**` mean the same as one.
                    if segments.last() == Some(&Segment::Any) {
                        continue;
                    }
                    Segment::Any
                }
                s if s.contains('*') => return Err(GlobError::PartialWildcard(s.to_owned())),
                s => Segment::Literal(s.to_owned()),
            });
            if segments.len() > MAX_SEGMENTS {
                return Err(GlobError::TooLong);
            }
        }
        Ok(Glob { segments })
    }

    /// Whether the root-relative `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        matches_from(&self.segments, &parts)
    }
}

/// Iterative matching with one backtrack point per `**` (the classic wildcard algorithm over
/// segments): linear in segments times parts, no recursion.
fn matches_from(pattern: &[Segment], parts: &[&str]) -> bool {
    let (mut p, mut s) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while s < parts.len() {
        match pattern.get(p) {
            Some(Segment::Any) => {
                star = Some((p, s));
                p += 1;
            }
            Some(Segment::One) => {
                p += 1;
                s += 1;
            }
            Some(Segment::Literal(l)) if l == parts[s] => {
                p += 1;
                s += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    p = sp + 1;
                    s = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|seg| *seg == Segment::Any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Glob::parse(pattern)
            .map(|g| g.matches(path))
            .unwrap_or(false)
    }

    #[test]
    fn one_star_matches_exactly_one_segment() {
        assert!(m("events/*", "events/a"));
        assert!(!m("events/*", "events/a/b"));
        assert!(!m("events/*", "events"));
        assert!(!m("events/*", "other/a"));
    }

    #[test]
    fn double_star_matches_zero_or_more_segments() {
        assert!(m("events/**", "events"));
        assert!(m("events/**", "events/a"));
        assert!(m("events/**", "events/a/b/c"));
        assert!(m("**", "x"));
        assert!(m("**/last", "a/b/last"));
        assert!(m("**/last", "last"));
        assert!(!m("**/last", "a/last/no"));
        assert!(m("a/**/z", "a/z"));
        assert!(m("a/**/z", "a/b/c/z"));
        assert!(!m("a/**/z", "a/b/c/y"));
        assert!(m("a/**/*/z", "a/b/z"));
        assert!(!m("a/**/*/z", "a/z"));
    }

    #[test]
    fn literals_match_whole_segments() {
        assert!(m("a/b", "a/b"));
        assert!(!m("a/b", "a/bc"));
        assert!(!m("a/b", "a"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert_eq!(Glob::parse(""), Err(GlobError::Empty));
        assert_eq!(Glob::parse("/a"), Err(GlobError::Absolute));
        assert_eq!(Glob::parse("a//b"), Err(GlobError::BadSegment));
        assert_eq!(Glob::parse("a/../b"), Err(GlobError::BadSegment));
        assert_eq!(
            Glob::parse("ev*"),
            Err(GlobError::PartialWildcard("ev*".into()))
        );
        assert_eq!(
            Glob::parse(&vec!["a"; MAX_SEGMENTS + 1].join("/")),
            Err(GlobError::TooLong)
        );
    }
}
