//! Which streams to follow: explicit paths, and prefix patterns (`/v1/stream/orders/*`) whose
//! members are found through the server's registry stream.
//!
//! The protocol has no list operation, so the server keeps a reserved JSON stream (default
//! `/_ds/registry`) to which every create appends `{"event":"created","path":...,"id":...}` and
//! every delete or expiry `{"event":"deleted","path":...,"id":...}` (`id` names the stream
//! instance, as `Stream-Id` does). When a pattern is configured the worker
//! follows it like any stream, from its own checkpoint row. Its events about covered paths
//! (explicit or under a pattern) take effect in the transaction that advances the registry's
//! checkpoint past them, so a crash can neither lose one nor apply one twice: `created` at a new
//! path gives it a checkpoint row, `created` at a path whose incarnation ended (deleted) starts
//! its next incarnation at the stream's beginning, `deleted` ends the current incarnation (its
//! follower stops; it would see 404 soon anyway). With ids, `created` of another stream than the
//! followed one also starts the next incarnation, and `deleted` of another stream than the
//! followed one changes nothing. See `batch` for the rules.

use std::collections::BTreeSet;

use serde::Deserialize;

/// Where the worker keeps streams of its own (the subscription's wake stream), never mirrored.
pub const SYNC_PREFIX: &str = "/_ds-sync/";

/// One event of the registry stream. Unknown fields are ignored so the server may add some.
#[derive(Debug, Deserialize)]
pub struct RegistryEvent {
    pub event: String,
    pub path: String,
    /// The stream instance's id (the `Stream-Id` of its responses), a JSON string; absent from
    /// servers that send no ids. A number is accepted too, and any other value counts as absent,
    /// so that an odd id never makes the worker skip an event.
    #[serde(default)]
    id: Option<serde_json::Value>,
}

impl RegistryEvent {
    /// The announced stream id, as the text `Stream-Id` carries.
    pub fn id(&self) -> Option<String> {
        match &self.id {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// The configured selection of streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Paths followed whatever the registry says.
    pub explicit: BTreeSet<String>,
    /// Prefixes from patterns ending in `*`.
    pub prefixes: Vec<String>,
    /// The registry path, never mirrored as a stream even if a prefix matches it.
    pub registry: String,
}

impl Selection {
    pub fn new(streams: &[String], registry: &str) -> Self {
        let mut explicit = BTreeSet::new();
        let mut prefixes = Vec::new();
        for s in streams {
            match s.strip_suffix('*') {
                Some(prefix) => prefixes.push(prefix.to_owned()),
                None => {
                    explicit.insert(s.clone());
                }
            }
        }
        Selection {
            explicit,
            prefixes,
            registry: registry.to_owned(),
        }
    }

    /// Whether the registry must be followed at all.
    pub fn needs_registry(&self) -> bool {
        !self.prefixes.is_empty()
    }

    /// Whether the worker mirrors `path`: an explicit path, or one under a pattern. Never the
    /// registry itself, nor the worker's own wake streams (under [`SYNC_PREFIX`]).
    pub fn covers(&self, path: &str) -> bool {
        path != self.registry
            && !path.starts_with(SYNC_PREFIX)
            && (self.explicit.contains(path)
                || self.prefixes.iter().any(|p| path.starts_with(p.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_select_by_prefix_and_never_the_registry() {
        let sel = Selection::new(
            &[
                "/v1/stream/a".into(),
                "/v1/stream/orders/*".into(),
                "/*".into(),
            ],
            "/_ds/registry",
        );
        assert!(sel.needs_registry());
        assert!(sel.covers("/v1/stream/orders/1"));
        assert!(sel.covers("/v1/stream/b"));
        assert!(sel.covers("/v1/stream/a"), "explicit paths are covered too");
        assert!(!sel.covers("/_ds/registry"));
        assert!(!sel.covers("/_ds-sync/ds-sync/wake"));
        let only_explicit = Selection::new(&["/x".into()], "/_ds/registry");
        assert!(!only_explicit.needs_registry());
        assert!(only_explicit.covers("/x"));
        assert!(!only_explicit.covers("/y"));
    }

    #[test]
    fn registry_ids_are_read_as_text_and_are_optional() {
        let id = |text: &str| {
            serde_json::from_str::<RegistryEvent>(text)
                .map(|e| e.id())
                .unwrap_or_else(|e| panic!("{text}: {e}"))
        };
        assert_eq!(
            id(r#"{"event":"created","path":"/a","id":"18446744073709551615"}"#),
            Some("18446744073709551615".to_owned())
        );
        assert_eq!(
            id(r#"{"event":"deleted","path":"/a","id":7}"#),
            Some("7".to_owned())
        );
        assert_eq!(id(r#"{"event":"deleted","path":"/a"}"#), None);
        assert_eq!(id(r#"{"event":"deleted","path":"/a","id":null}"#), None);
    }
}
