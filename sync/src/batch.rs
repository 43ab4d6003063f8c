//! What a read delivers, and how a batch of updates is applied on top of the stored checkpoints.
//!
//! A *read* is everything one protocol response carried between two offsets: the data events of
//! an SSE connection up to and including a control event, or one long-poll body. Its rows are
//! keyed `(stream, incarnation, start_offset, idx)`. An *incarnation* is one stream at a path: a
//! path deleted and created again holds a new stream whose offsets start again, so ds-sync numbers
//! the streams it mirrors at each path (1, 2, …) and keeps one checkpoint row per path, for the
//! latest.
//!
//! This module is pure (no I/O) so that the exactly-once rules are unit tested on their own:
//! - apply exactly the reads that start at or after the stored checkpoint, never split one;
//! - apply a read only to the incarnation it was read for: a read of an incarnation that has
//!   ended since is dropped, never written under the next one;
//! - apply a read only if it came from the incarnation's stream: a read whose `Stream-Id` differs
//!   from the id recorded for its incarnation is dropped and ends the incarnation (the fence);
//! - the registry's announcements, in order, move incarnations: `created` at a path whose
//!   incarnation has ended (or that holds another stream id) starts the next one at `-1`,
//!   `deleted` ends the current one unless it names another stream id.
//!
//! Stream ids are optional everywhere (a server may send none): where either side lacks one, the
//! rules fall back to incarnation numbers and offsets alone.
//!
//! `writer` runs the result inside one Postgres transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

/// The offset a stream is read from when nothing of it is mirrored yet (the protocol's start).
pub const START_OFFSET: &str = "-1";

/// ds-sync's number for one stream at a path, from 1 (`ds_checkpoints.incarnation`).
pub type Incarnation = i32;

/// The server's id of one stream instance (`Stream-Id`, the registry's `id`), opaque text.
pub type StreamId = String;

/// One mirrored row's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// The text of one JSON message, stored as `jsonb`.
    Json(String),
    /// One chunk of a non-JSON stream, stored as `bytea`.
    Bytes(Bytes),
}

impl Row {
    pub fn len(&self) -> usize {
        match self {
            Row::Json(s) => s.len(),
            Row::Bytes(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the registry said happened at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Created,
    Deleted,
}

/// One registry event about a path the worker's selection covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub event: Lifecycle,
    pub path: String,
    /// The stream instance the event is about; `None` from a server that sends no ids.
    pub id: Option<StreamId>,
}

/// Everything one response delivered for one stream, committed all or nothing.
#[derive(Debug)]
pub struct Read {
    pub stream: Arc<str>,
    /// The incarnation the follower was reading; the read applies to no other.
    pub incarnation: Incarnation,
    /// The `Stream-Id` of the response the read came from (`None` if the server sent none): the
    /// read applies only if its incarnation's recorded id is the same or not known yet.
    pub stream_id: Option<StreamId>,
    pub content_type: Arc<str>,
    /// Where the read began: the previous next offset (`-1` for the first read).
    pub start_offset: String,
    /// Where the next read begins.
    pub next_offset: String,
    pub rows: Vec<Row>,
    /// The server signalled end of stream at `next_offset`.
    pub closed: bool,
    pub received_at: SystemTime,
    /// For a read of the registry: its events about selected paths, in order. They take effect
    /// in the transaction that advances the registry's checkpoint past them, so a crash can
    /// neither lose one nor apply one twice.
    pub announcements: Vec<Announcement>,
    /// This read's share of `max_inflight_bytes`, given back when the read is committed and
    /// dropped: what bounds the memory held between followers and Postgres.
    pub budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Read {
    pub fn payload_bytes(&self) -> usize {
        self.rows.iter().map(Row::len).sum::<usize>()
            + self
                .announcements
                .iter()
                .map(|a| a.path.len())
                .sum::<usize>()
    }
}

/// What followers hand to the writer, in stream order.
#[derive(Debug)]
pub enum Update {
    Read(Read),
    /// The incarnation's stream is gone: the server answered 404 or 410 (`status`), or the path
    /// now holds another stream (`status` `None`: offsets went backwards). Recorded as deleted;
    /// this incarnation is no longer followed.
    Gone {
        stream: Arc<str>,
        incarnation: Incarnation,
        status: Option<u16>,
    },
    /// The path now holds another stream and its follower goes on with it: the next incarnation
    /// starts at `-1`, for `stream_id` (the new stream's, when the server named it). For the
    /// registry itself, and for paths no registry is followed for.
    Restart {
        stream: Arc<str>,
        incarnation: Incarnation,
        stream_id: Option<StreamId>,
    },
    /// The registry has been read to its tail: once this commits, so has every announcement
    /// read before it.
    CaughtUp {
        stream: Arc<str>,
    },
}

impl Update {
    pub fn stream(&self) -> &Arc<str> {
        match self {
            Update::Read(r) => &r.stream,
            Update::Gone { stream, .. }
            | Update::Restart { stream, .. }
            | Update::CaughtUp { stream } => stream,
        }
    }
}

/// One path's row of `ds_checkpoints`: its latest incarnation and where that stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub incarnation: Incarnation,
    /// Where the next read of the incarnation begins (`-1`: from the start).
    pub next_offset: String,
    pub content_type: Option<String>,
    pub closed: bool,
    pub deleted: bool,
    /// 404 or 410; `None` when the delete was learned from the registry or from the path
    /// holding another stream.
    pub deleted_status: Option<i16>,
    /// The server's id of the incarnation's stream, once known (`ds_checkpoints.stream_id`).
    pub stream_id: Option<StreamId>,
}

impl Checkpoint {
    /// Where incarnation `incarnation` starts: at the beginning, content type not yet known,
    /// stream id as far as known.
    pub fn fresh(incarnation: Incarnation, stream_id: Option<StreamId>) -> Self {
        Checkpoint {
            incarnation,
            next_offset: START_OFFSET.to_owned(),
            content_type: None,
            closed: false,
            deleted: false,
            deleted_status: None,
            stream_id,
        }
    }

    /// Whether a response naming `seen` may be committed to this incarnation: unless both ids
    /// are known and differ.
    pub fn admits(&self, seen: Option<&str>) -> bool {
        match (self.stream_id.as_deref(), seen) {
            (Some(known), Some(seen)) => known == seen,
            _ => true,
        }
    }
}

/// What the worker must do once a batch has committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Follow this incarnation of `path` (a stream discovered, or created again).
    Follow {
        path: String,
        incarnation: Incarnation,
    },
    /// Stop following this incarnation: the registry announced its delete.
    Stop {
        path: String,
        incarnation: Incarnation,
    },
    /// The registry is read to its tail and committed.
    RegistryCaughtUp,
}

/// Why a batch cannot be applied on top of the stored checkpoints.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReconcileError {
    #[error("stream {stream}: no checkpoint row")]
    MissingCheckpoint { stream: String },
    #[error(
        "stream {stream}: checkpoint is at {stored:?} but the batch covers {first_start:?}..{last_next:?} \
         (another worker is following this stream?)"
    )]
    CheckpointMoved {
        stream: String,
        stored: String,
        first_start: String,
        last_next: String,
    },
    #[error(
        "stream {stream}: read starting at {start:?} does not follow the previous read's end {previous_next:?}"
    )]
    NotContiguous {
        stream: String,
        previous_next: String,
        start: String,
    },
}

/// The part of a batch still to apply once the stored checkpoints are known.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Reads whose rows to insert, in order, each under its own incarnation.
    pub reads: Vec<&'a Read>,
    /// The new row of every path the batch changed, by path.
    pub checkpoints: Vec<(&'a str, Checkpoint)>,
    /// What to tell the worker after the commit, in batch order.
    pub notices: Vec<Notice>,
    /// Positions in the batch of the updates that took effect.
    pub applied: Vec<usize>,
    /// Reads and ends of incarnations that had already ended: dropped.
    pub stale: usize,
    /// Reads from another stream than their incarnation's (by `Stream-Id`): dropped, and their
    /// incarnation ended.
    pub fenced: usize,
}

/// One path while a batch is folded over it.
#[derive(Debug)]
struct PathState<'a> {
    checkpoint: Option<Checkpoint>,
    changed: bool,
    /// A read of the current incarnation met the checkpoint: later reads apply.
    synced: bool,
    /// Reads of the current incarnation that have not met the checkpoint yet: (first start,
    /// last next). Still set at the end of the batch, they mean the checkpoint moved under us.
    unmatched: Option<(&'a str, &'a str)>,
    /// The end of this stream's previous read in the batch, for the contiguity check.
    previous: Option<(Incarnation, &'a str)>,
}

impl<'a> PathState<'a> {
    fn load(stored: &HashMap<String, Checkpoint>, path: &str) -> Self {
        PathState {
            checkpoint: stored.get(path).cloned(),
            changed: false,
            synced: false,
            unmatched: None,
            previous: None,
        }
    }

    /// Replaces the checkpoint with the start of `incarnation`, of stream `stream_id`.
    fn start_incarnation(&mut self, incarnation: Incarnation, stream_id: Option<StreamId>) {
        self.checkpoint = Some(Checkpoint::fresh(incarnation, stream_id));
        self.changed = true;
        self.synced = false;
    }

    /// Whether the stored row is at `incarnation`.
    fn is_at(&self, incarnation: Incarnation) -> bool {
        self.checkpoint
            .as_ref()
            .is_some_and(|cp| cp.incarnation == incarnation)
    }
}

/// Folds `batch`, in order, over the `stored` checkpoints of the paths it touches (locked by the
/// caller) and returns what to write.
///
/// Reads of one stream and incarnation must chain (`start == previous next`). Reads that end at
/// or before the stored checkpoint were committed by an earlier attempt whose COMMIT we could not
/// confirm (the connection died), so they are skipped; a read of an incarnation other than the
/// stored one is stale and dropped; a read whose stream id is not the incarnation's is fenced:
/// dropped, and the incarnation ends (deleted, no status; the stream it came from is the next
/// incarnation's, started by the registry's `created` or by the follower's `Restart`); anything
/// else that disagrees with the checkpoint is an error,
/// never a guess. Folding the same batch over the state it produced applies nothing again.
pub fn reconcile<'a>(
    batch: &'a [Update],
    stored: &HashMap<String, Checkpoint>,
) -> Result<Plan<'a>, ReconcileError> {
    let mut plan = Plan::default();
    let mut paths: HashMap<&'a str, PathState<'a>> = HashMap::new();
    for (position, update) in batch.iter().enumerate() {
        match update {
            Update::Read(read) => {
                let state = paths
                    .entry(&read.stream)
                    .or_insert_with(|| PathState::load(stored, &read.stream));
                if let Some((incarnation, previous_next)) = state.previous
                    && incarnation == read.incarnation
                    && previous_next != read.start_offset
                {
                    return Err(ReconcileError::NotContiguous {
                        stream: read.stream.to_string(),
                        previous_next: previous_next.to_owned(),
                        start: read.start_offset.clone(),
                    });
                }
                state.previous = Some((read.incarnation, &read.next_offset));
                let Some(cp) = state.checkpoint.as_mut() else {
                    return Err(ReconcileError::MissingCheckpoint {
                        stream: read.stream.to_string(),
                    });
                };
                if cp.incarnation != read.incarnation {
                    plan.stale += 1;
                    continue;
                }
                if !cp.admits(read.stream_id.as_deref()) {
                    plan.fenced += 1;
                    if !cp.deleted {
                        cp.deleted = true;
                        cp.deleted_status = None;
                        state.changed = true;
                        plan.notices.push(Notice::Stop {
                            path: read.stream.to_string(),
                            incarnation: cp.incarnation,
                        });
                    }
                    continue;
                }
                if !state.synced {
                    if read.start_offset == cp.next_offset {
                        state.synced = true;
                        state.unmatched = None;
                    } else if read.next_offset == cp.next_offset {
                        // Applied by an earlier attempt, like every read before it.
                        state.synced = true;
                        state.unmatched = None;
                        continue;
                    } else {
                        state
                            .unmatched
                            .get_or_insert((&read.start_offset, &read.next_offset))
                            .1 = &read.next_offset;
                        continue;
                    }
                }
                if let Some(cp) = state.checkpoint.as_mut() {
                    cp.next_offset.clone_from(&read.next_offset);
                    cp.closed |= read.closed;
                    cp.content_type = Some(read.content_type.to_string());
                    // The first committed read names the incarnation's stream, if nothing did.
                    if cp.stream_id.is_none() {
                        cp.stream_id.clone_from(&read.stream_id);
                    }
                }
                state.changed = true;
                plan.reads.push(read);
                plan.applied.push(position);
                for announcement in &read.announcements {
                    announce(&mut paths, stored, announcement, &mut plan.notices);
                }
            }
            Update::Gone {
                stream,
                incarnation,
                status,
            } => {
                let state = paths
                    .entry(stream)
                    .or_insert_with(|| PathState::load(stored, stream));
                let Some(cp) = state
                    .checkpoint
                    .as_mut()
                    .filter(|cp| cp.incarnation == *incarnation)
                else {
                    plan.stale += 1;
                    continue;
                };
                let status = status.map(|s| i16::try_from(s).unwrap_or(i16::MAX));
                if !cp.deleted || (cp.deleted_status.is_none() && status.is_some()) {
                    cp.deleted = true;
                    cp.deleted_status = status.or(cp.deleted_status);
                    state.changed = true;
                }
                plan.applied.push(position);
            }
            Update::Restart {
                stream,
                incarnation,
                stream_id,
            } => {
                let state = paths
                    .entry(stream)
                    .or_insert_with(|| PathState::load(stored, stream));
                if !state.is_at(*incarnation) {
                    plan.stale += 1;
                    continue;
                }
                state.start_incarnation(incarnation + 1, stream_id.clone());
                plan.applied.push(position);
            }
            Update::CaughtUp { .. } => {
                plan.notices.push(Notice::RegistryCaughtUp);
                plan.applied.push(position);
            }
        }
    }
    let mut checkpoints = Vec::new();
    for (path, state) in paths {
        if let (Some((first_start, last_next)), Some(cp)) = (state.unmatched, &state.checkpoint) {
            return Err(ReconcileError::CheckpointMoved {
                stream: path.to_owned(),
                stored: cp.next_offset.clone(),
                first_start: first_start.to_owned(),
                last_next: last_next.to_owned(),
            });
        }
        if state.changed
            && let Some(cp) = state.checkpoint
        {
            checkpoints.push((path, cp));
        }
    }
    checkpoints.sort_by(|a, b| a.0.cmp(b.0));
    plan.checkpoints = checkpoints;
    Ok(plan)
}

/// Applies one registry announcement: `created` at a path without a row, whose incarnation
/// ended, or whose incarnation is known to be of another stream id starts its next incarnation
/// for the announced id (a `created` of the incarnation's own stream changes nothing: with ids,
/// the same id; without, a row still followed); `deleted` ends the current incarnation, even
/// before its follower sees the 404, unless both ids are known and differ (a late delete of an
/// earlier stream at the path must not end a newer one). A `deleted` ending an incarnation whose
/// id was not known yet records the announced id, so that reads of a later stream still in
/// flight are fenced from it.
fn announce<'a>(
    paths: &mut HashMap<&'a str, PathState<'a>>,
    stored: &HashMap<String, Checkpoint>,
    announcement: &'a Announcement,
    notices: &mut Vec<Notice>,
) {
    let path = announcement.path.as_str();
    let state = paths
        .entry(path)
        .or_insert_with(|| PathState::load(stored, path));
    match announcement.event {
        Lifecycle::Created => {
            let id = announcement.id.as_deref();
            let next = match &state.checkpoint {
                None => 1,
                Some(cp) if id.is_some() && cp.stream_id.as_deref() == id => return,
                Some(cp) if cp.deleted => cp.incarnation + 1,
                Some(cp) if !cp.admits(id) => {
                    // The followed stream was replaced without a `deleted` reaching us first.
                    notices.push(Notice::Stop {
                        path: path.to_owned(),
                        incarnation: cp.incarnation,
                    });
                    cp.incarnation + 1
                }
                Some(_) => return,
            };
            state.start_incarnation(next, announcement.id.clone());
            notices.push(Notice::Follow {
                path: path.to_owned(),
                incarnation: next,
            });
        }
        Lifecycle::Deleted => {
            if let Some(cp) = state.checkpoint.as_mut()
                && !cp.deleted
                && cp.admits(announcement.id.as_deref())
            {
                cp.deleted = true;
                cp.deleted_status = None;
                if cp.stream_id.is_none() {
                    cp.stream_id.clone_from(&announcement.id);
                }
                state.changed = true;
                notices.push(Notice::Stop {
                    path: path.to_owned(),
                    incarnation: cp.incarnation,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGISTRY: &str = "/_ds/registry";

    fn read_of(stream: &str, incarnation: Incarnation, start: &str, next: &str) -> Read {
        Read {
            stream: stream.into(),
            incarnation,
            stream_id: None,
            content_type: "application/octet-stream".into(),
            start_offset: start.into(),
            next_offset: next.into(),
            rows: vec![Row::Bytes(Bytes::from_static(b"x"))],
            closed: false,
            received_at: SystemTime::UNIX_EPOCH,
            announcements: Vec::new(),
            budget: None,
        }
    }

    fn read(stream: &str, start: &str, next: &str) -> Update {
        Update::Read(read_of(stream, 1, start, next))
    }

    fn registry(start: &str, next: &str, events: &[(Lifecycle, &str)]) -> Update {
        let mut read = read_of(REGISTRY, 1, start, next);
        read.rows.clear();
        read.announcements = events
            .iter()
            .map(|(event, path)| Announcement {
                event: *event,
                path: (*path).to_owned(),
                id: None,
            })
            .collect();
        Update::Read(read)
    }

    fn at(incarnation: Incarnation, next: &str) -> Checkpoint {
        Checkpoint {
            next_offset: next.to_owned(),
            ..Checkpoint::fresh(incarnation, None)
        }
    }

    fn deleted(incarnation: Incarnation, next: &str) -> Checkpoint {
        Checkpoint {
            deleted: true,
            deleted_status: Some(404),
            ..at(incarnation, next)
        }
    }

    fn stored(rows: &[(&str, Checkpoint)]) -> HashMap<String, Checkpoint> {
        rows.iter()
            .map(|(s, cp)| ((*s).to_owned(), cp.clone()))
            .collect()
    }

    fn plan<'a>(batch: &'a [Update], stored: &HashMap<String, Checkpoint>) -> Plan<'a> {
        reconcile(batch, stored).unwrap_or_else(|e| panic!("{e}"))
    }

    /// (stream, incarnation, start) of the reads to insert.
    fn inserted(plan: &Plan<'_>) -> Vec<(String, Incarnation, String)> {
        plan.reads
            .iter()
            .map(|r| (r.stream.to_string(), r.incarnation, r.start_offset.clone()))
            .collect()
    }

    fn checkpoint<'p>(plan: &'p Plan<'_>, stream: &str) -> Option<&'p Checkpoint> {
        plan.checkpoints
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, cp)| cp)
    }

    /// `stored` after the plan's checkpoints are written, as the writer's upsert does.
    fn committed(
        mut stored: HashMap<String, Checkpoint>,
        plan: &Plan<'_>,
    ) -> HashMap<String, Checkpoint> {
        for (stream, cp) in &plan.checkpoints {
            stored.insert((*stream).to_owned(), cp.clone());
        }
        stored
    }

    #[test]
    fn fresh_batch_applies_every_read_and_moves_each_checkpoint_to_its_last_read() {
        let batch = vec![
            read("/a", "-1", "1"),
            read("/b", "5", "6"),
            read("/a", "1", "2"),
        ];
        let plan = plan(&batch, &stored(&[("/a", at(1, "-1")), ("/b", at(1, "5"))]));
        assert_eq!(plan.reads.len(), 3);
        assert_eq!(plan.applied, vec![0, 1, 2]);
        assert_eq!(
            plan.checkpoints
                .iter()
                .map(|(s, cp)| (*s, cp.next_offset.as_str()))
                .collect::<Vec<_>>(),
            vec![("/a", "2"), ("/b", "6")]
        );
    }

    #[test]
    fn retry_after_an_unconfirmed_commit_applies_nothing_twice() {
        let batch = vec![read("/a", "-1", "1"), read("/a", "1", "2")];
        // The first attempt committed: the checkpoint already sits at the batch's end.
        let plan_after = plan(&batch, &stored(&[("/a", at(1, "2"))]));
        assert!(plan_after.reads.is_empty());
        assert!(plan_after.checkpoints.is_empty());
        // A checkpoint in the middle of the batch: only the rest applies.
        let plan_middle = plan(&batch, &stored(&[("/a", at(1, "1"))]));
        assert_eq!(inserted(&plan_middle), vec![("/a".into(), 1, "1".into())]);
    }

    #[test]
    fn a_checkpoint_outside_the_batch_is_an_error_not_a_guess() {
        let batch = vec![read("/a", "3", "4")];
        let err = reconcile(&batch, &stored(&[("/a", at(1, "1"))])).err();
        assert!(matches!(err, Some(ReconcileError::CheckpointMoved { .. })));
        let err = reconcile(&batch, &stored(&[])).err();
        assert!(matches!(
            err,
            Some(ReconcileError::MissingCheckpoint { .. })
        ));
    }

    #[test]
    fn a_gap_between_reads_of_one_stream_is_an_error() {
        let batch = vec![read("/a", "-1", "1"), read("/a", "2", "3")];
        let err = reconcile(&batch, &stored(&[("/a", at(1, "-1"))])).err();
        assert!(matches!(err, Some(ReconcileError::NotContiguous { .. })));
    }

    #[test]
    fn reads_of_an_ended_incarnation_are_dropped_not_written_under_the_next() {
        // The path was re-created (incarnation 2, from the start) while the old follower still
        // had a read of incarnation 1 in flight; its offsets would collide with the new rows.
        let batch = vec![
            Update::Read(read_of("/a", 1, "7", "9")),
            Update::Gone {
                stream: "/a".into(),
                incarnation: 1,
                status: Some(404),
            },
            Update::Read(read_of("/a", 2, "-1", "3")),
        ];
        let plan = plan(&batch, &stored(&[("/a", at(2, "-1"))]));
        assert_eq!(inserted(&plan), vec![("/a".into(), 2, "-1".into())]);
        assert_eq!(plan.stale, 2);
        let cp = checkpoint(&plan, "/a").cloned();
        assert_eq!(
            cp.map(|cp| (cp.incarnation, cp.next_offset, cp.deleted)),
            Some((2, "3".to_owned(), false))
        );
    }

    #[test]
    fn created_after_the_end_of_an_incarnation_starts_the_next_one_at_the_beginning() {
        let batch = vec![registry(
            "10",
            "20",
            &[
                (Lifecycle::Created, "/gone"),
                (Lifecycle::Created, "/live"),
                (Lifecycle::Created, "/new"),
            ],
        )];
        let before = stored(&[
            (REGISTRY, at(1, "10")),
            ("/gone", deleted(3, "0000_0042")),
            ("/live", at(1, "0000_0007")),
        ]);
        let plan = plan(&batch, &before);
        assert_eq!(
            checkpoint(&plan, "/gone"),
            Some(&Checkpoint::fresh(4, None))
        );
        assert_eq!(checkpoint(&plan, "/new"), Some(&Checkpoint::fresh(1, None)));
        // The create of the incarnation already followed (e.g. an explicit path) changes nothing.
        assert_eq!(checkpoint(&plan, "/live"), None);
        assert_eq!(
            plan.notices,
            vec![
                Notice::Follow {
                    path: "/gone".into(),
                    incarnation: 4
                },
                Notice::Follow {
                    path: "/new".into(),
                    incarnation: 1
                },
            ]
        );
    }

    #[test]
    fn deleted_then_created_ends_the_followed_incarnation_even_before_its_follower_saw_a_404() {
        // The follower of incarnation 1 has not noticed the delete; the registry has seen the
        // delete and the re-create. Reads of incarnation 1 committed before the announcement
        // stay, those after it are dropped.
        let batch = vec![
            Update::Read(read_of("/p", 1, "0000_0005", "0000_0009")),
            registry(
                "10",
                "20",
                &[(Lifecycle::Deleted, "/p"), (Lifecycle::Created, "/p")],
            ),
            Update::Read(read_of("/p", 1, "0000_0009", "0000_0012")),
        ];
        let before = stored(&[(REGISTRY, at(1, "10")), ("/p", at(1, "0000_0005"))]);
        let plan = plan(&batch, &before);
        assert_eq!(
            inserted(&plan),
            vec![
                ("/p".into(), 1, "0000_0005".into()),
                (REGISTRY.into(), 1, "10".into())
            ]
        );
        assert_eq!(plan.stale, 1);
        assert_eq!(checkpoint(&plan, "/p"), Some(&Checkpoint::fresh(2, None)));
        assert_eq!(
            plan.notices,
            vec![
                Notice::Stop {
                    path: "/p".into(),
                    incarnation: 1
                },
                Notice::Follow {
                    path: "/p".into(),
                    incarnation: 2
                },
            ]
        );
    }

    #[test]
    fn a_delete_announced_alone_ends_the_incarnation_and_its_404_only_adds_the_status() {
        let batch = vec![
            registry("10", "20", &[(Lifecycle::Deleted, "/p")]),
            Update::Gone {
                stream: "/p".into(),
                incarnation: 1,
                status: Some(410),
            },
        ];
        let plan = plan(
            &batch,
            &stored(&[(REGISTRY, at(1, "10")), ("/p", at(1, "8"))]),
        );
        let cp = checkpoint(&plan, "/p").cloned();
        assert_eq!(
            cp.map(|cp| (
                cp.incarnation,
                cp.next_offset,
                cp.deleted,
                cp.deleted_status
            )),
            Some((1, "8".to_owned(), true, Some(410)))
        );
    }

    #[test]
    fn restart_starts_the_next_incarnation_and_its_reads_apply_in_the_same_batch() {
        let batch = vec![
            Update::Read(read_of("/r", 1, "5", "6")),
            Update::Restart {
                stream: "/r".into(),
                incarnation: 1,
                stream_id: None,
            },
            Update::Read(read_of("/r", 2, "-1", "2")),
        ];
        let plan = plan(&batch, &stored(&[("/r", at(1, "5"))]));
        assert_eq!(
            inserted(&plan),
            vec![("/r".into(), 1, "5".into()), ("/r".into(), 2, "-1".into())]
        );
        let cp = checkpoint(&plan, "/r").cloned();
        assert_eq!(
            cp.map(|cp| (cp.incarnation, cp.next_offset)),
            Some((2, "2".to_owned()))
        );
    }

    #[test]
    fn folding_a_batch_over_the_state_it_produced_applies_nothing_again() {
        // What the writer's retry sees when a COMMIT it could not confirm did land.
        let batch = vec![
            Update::Read(read_of("/p", 1, "0000_0005", "0000_0009")),
            registry(
                "10",
                "20",
                &[
                    (Lifecycle::Deleted, "/p"),
                    (Lifecycle::Created, "/p"),
                    (Lifecycle::Created, "/q"),
                ],
            ),
            Update::Gone {
                stream: "/p".into(),
                incarnation: 1,
                status: Some(404),
            },
            Update::Read(read_of("/s", 1, "-1", "3")),
            Update::Restart {
                stream: "/s".into(),
                incarnation: 1,
                stream_id: None,
            },
            Update::Read(read_of("/s", 2, "-1", "1")),
            Update::CaughtUp {
                stream: REGISTRY.into(),
            },
        ];
        let before = stored(&[
            (REGISTRY, at(1, "10")),
            ("/p", at(1, "0000_0005")),
            ("/s", at(1, "-1")),
        ]);
        let first = plan(&batch, &before);
        assert_eq!(first.reads.len(), 4);
        let after = committed(before, &first);
        let again = plan(&batch, &after);
        assert!(again.reads.is_empty(), "{:?}", inserted(&again));
        assert!(again.checkpoints.is_empty(), "{:?}", again.checkpoints);
        assert!(
            !again
                .notices
                .iter()
                .any(|n| matches!(n, Notice::Follow { .. } | Notice::Stop { .. })),
            "{:?}",
            again.notices
        );
    }

    fn read_from(
        stream: &str,
        incarnation: Incarnation,
        id: &str,
        start: &str,
        next: &str,
    ) -> Update {
        Update::Read(Read {
            stream_id: Some(id.to_owned()),
            ..read_of(stream, incarnation, start, next)
        })
    }

    fn registry_with_ids(start: &str, next: &str, events: &[(Lifecycle, &str, &str)]) -> Update {
        let mut read = read_of(REGISTRY, 1, start, next);
        read.rows.clear();
        read.announcements = events
            .iter()
            .map(|(event, path, id)| Announcement {
                event: *event,
                path: (*path).to_owned(),
                id: Some((*id).to_owned()),
            })
            .collect();
        Update::Read(read)
    }

    fn of(id: &str, cp: Checkpoint) -> Checkpoint {
        Checkpoint {
            stream_id: Some(id.to_owned()),
            ..cp
        }
    }

    #[test]
    fn a_read_of_another_stream_id_is_never_committed_and_ends_the_incarnation() {
        // The path was deleted and re-created and the new stream grew past the checkpoint: the
        // offsets chain, only the stream id tells the reads apart.
        let batch = vec![
            read_from("/p", 1, "7", "0000_0005", "0000_0009"),
            read_from("/p", 1, "8", "0000_0009", "0000_0012"),
            read_from("/p", 1, "8", "0000_0012", "0000_0020"),
        ];
        let before = stored(&[("/p", of("7", at(1, "0000_0005")))]);
        let plan = plan(&batch, &before);
        assert_eq!(inserted(&plan), vec![("/p".into(), 1, "0000_0005".into())]);
        assert_eq!(plan.fenced, 2);
        let cp = checkpoint(&plan, "/p").cloned();
        assert_eq!(
            cp.map(|cp| (cp.next_offset, cp.deleted, cp.deleted_status, cp.stream_id)),
            Some(("0000_0009".to_owned(), true, None, Some("7".to_owned())))
        );
        assert_eq!(
            plan.notices,
            vec![Notice::Stop {
                path: "/p".into(),
                incarnation: 1
            }]
        );
        // Folding again over what it produced changes nothing more.
        let again = super::reconcile(&batch, &committed(before, &plan));
        let again = again.unwrap_or_else(|e| panic!("{e}"));
        assert!(again.reads.is_empty() && again.checkpoints.is_empty() && again.notices.is_empty());
    }

    #[test]
    fn the_first_committed_read_names_the_incarnation_and_reads_without_an_id_still_apply() {
        let batch = vec![
            read_from("/p", 1, "7", "-1", "1"),
            read("/p", "1", "2"),
            read_from("/p", 1, "9", "2", "3"),
        ];
        let plan = plan(&batch, &stored(&[("/p", at(1, "-1"))]));
        // The id-less read (an older server, or a proxy that dropped the header) is checked by
        // offsets alone; the read of stream 9 is not the incarnation's.
        assert_eq!(
            inserted(&plan),
            vec![("/p".into(), 1, "-1".into()), ("/p".into(), 1, "1".into())]
        );
        assert_eq!(plan.fenced, 1);
        let cp = checkpoint(&plan, "/p").cloned();
        assert_eq!(
            cp.map(|cp| (cp.next_offset, cp.deleted, cp.stream_id)),
            Some(("2".to_owned(), true, Some("7".to_owned())))
        );
    }

    #[test]
    fn a_late_delete_of_an_earlier_stream_does_not_end_a_newer_incarnation() {
        let batch = vec![registry_with_ids(
            "10",
            "20",
            &[
                (Lifecycle::Deleted, "/p", "7"),
                (Lifecycle::Deleted, "/q", "3"),
            ],
        )];
        let before = stored(&[
            (REGISTRY, at(1, "10")),
            ("/p", of("8", at(2, "0000_0004"))),
            ("/q", of("3", at(1, "0000_0004"))),
        ]);
        let plan = plan(&batch, &before);
        assert_eq!(checkpoint(&plan, "/p"), None, "stream 8 lives on");
        assert_eq!(checkpoint(&plan, "/q").map(|cp| cp.deleted), Some(true));
        assert_eq!(
            plan.notices,
            vec![Notice::Stop {
                path: "/q".into(),
                incarnation: 1
            }]
        );
    }

    #[test]
    fn created_with_ids_starts_an_incarnation_only_for_a_stream_not_mirrored_yet() {
        let batch = vec![registry_with_ids(
            "10",
            "20",
            &[
                // The followed stream's own create, and a late create of a stream whose 404
                // the follower saw first: nothing.
                (Lifecycle::Created, "/own", "5"),
                (Lifecycle::Created, "/gone", "6"),
                // A followed stream replaced without a delete reaching us.
                (Lifecycle::Created, "/replaced", "9"),
                // No id known for the row: today's rule (a followed row is its own stream).
                (Lifecycle::Created, "/legacy", "4"),
                (Lifecycle::Created, "/new", "11"),
            ],
        )];
        let before = stored(&[
            (REGISTRY, at(1, "10")),
            ("/own", of("5", at(1, "0000_0003"))),
            ("/gone", of("6", deleted(2, "0000_0003"))),
            ("/replaced", of("8", at(3, "0000_0003"))),
            ("/legacy", at(1, "0000_0003")),
        ]);
        let plan = plan(&batch, &before);
        assert_eq!(checkpoint(&plan, "/own"), None);
        assert_eq!(checkpoint(&plan, "/gone"), None);
        assert_eq!(checkpoint(&plan, "/legacy"), None);
        assert_eq!(
            checkpoint(&plan, "/replaced"),
            Some(&Checkpoint::fresh(4, Some("9".into())))
        );
        assert_eq!(
            checkpoint(&plan, "/new"),
            Some(&Checkpoint::fresh(1, Some("11".into())))
        );
        assert_eq!(
            plan.notices,
            vec![
                Notice::Stop {
                    path: "/replaced".into(),
                    incarnation: 3
                },
                Notice::Follow {
                    path: "/replaced".into(),
                    incarnation: 4
                },
                Notice::Follow {
                    path: "/new".into(),
                    incarnation: 1
                },
            ]
        );
    }

    #[test]
    fn a_delete_that_names_the_stream_of_an_unnamed_incarnation_fences_later_reads_of_another() {
        // Nothing of the incarnation committed yet, so its id is unknown; the registry's delete
        // of stream 7 ends it and names it, so the follower's read of the re-created stream 8,
        // still in flight, is not committed to it; the create of 8 starts the next incarnation.
        let batch = vec![
            registry_with_ids("10", "20", &[(Lifecycle::Deleted, "/p", "7")]),
            read_from("/p", 1, "8", "-1", "0000_0004"),
            registry_with_ids("20", "30", &[(Lifecycle::Created, "/p", "8")]),
        ];
        let plan = plan(
            &batch,
            &stored(&[(REGISTRY, at(1, "10")), ("/p", at(1, "-1"))]),
        );
        assert_eq!(plan.fenced, 1);
        assert!(inserted(&plan).iter().all(|(s, _, _)| s == REGISTRY));
        assert_eq!(
            checkpoint(&plan, "/p"),
            Some(&Checkpoint::fresh(2, Some("8".into())))
        );
    }

    #[test]
    fn restart_names_the_new_incarnation_by_the_id_that_ended_the_old_one() {
        let batch = vec![
            Update::Restart {
                stream: "/r".into(),
                incarnation: 1,
                stream_id: Some("12".into()),
            },
            read_from("/r", 2, "12", "-1", "0000_0002"),
        ];
        let plan = plan(&batch, &stored(&[("/r", of("11", at(1, "0000_0005")))]));
        assert_eq!(inserted(&plan), vec![("/r".into(), 2, "-1".into())]);
        let cp = checkpoint(&plan, "/r").cloned();
        assert_eq!(
            cp.map(|cp| (cp.incarnation, cp.next_offset, cp.stream_id)),
            Some((2, "0000_0002".to_owned(), Some("12".to_owned())))
        );
    }
}
