//! What a read delivers and how a batch of reads is reconciled with the stored checkpoints.
//!
//! A *read* is everything one protocol response carried between two offsets: the data events of
//! an SSE connection up to and including a control event, or one long-poll body. Its rows are
//! keyed `(stream, start_offset, idx)`. This module is pure (no I/O) so that the exactly-once rule
//! — apply exactly the reads that start at or after the stored checkpoint, never split one —
//! is unit tested on its own; `writer` runs the result inside one Postgres transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

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

/// Everything one response delivered for one stream, committed all or nothing.
#[derive(Debug)]
pub struct Read {
    pub stream: Arc<str>,
    pub content_type: Arc<str>,
    /// Where the read began: the previous next offset (`-1` for the first read).
    pub start_offset: String,
    /// Where the next read begins.
    pub next_offset: String,
    pub rows: Vec<Row>,
    /// The server signalled end of stream at `next_offset`.
    pub closed: bool,
    pub received_at: SystemTime,
    /// Stream paths this read of the registry discovered; their checkpoint rows commit with it.
    pub discovered: Vec<String>,
    /// This read's share of `max_inflight_bytes`, given back when the read is committed and
    /// dropped: what bounds the memory held between followers and Postgres.
    pub budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Read {
    pub fn payload_bytes(&self) -> usize {
        self.rows.iter().map(Row::len).sum::<usize>()
            + self.discovered.iter().map(String::len).sum::<usize>()
    }
}

/// What followers hand to the writer, in stream order.
#[derive(Debug)]
pub enum Update {
    Read(Read),
    /// The server answered 404 or 410: record it; the stream is no longer followed.
    Gone {
        stream: Arc<str>,
        status: u16,
    },
}

impl Update {
    pub fn stream(&self) -> &Arc<str> {
        match self {
            Update::Read(r) => &r.stream,
            Update::Gone { stream, .. } => stream,
        }
    }
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
    /// Reads to insert, in order.
    pub reads: Vec<&'a Read>,
    /// New checkpoint per stream: (stream, next offset, closed, content type).
    pub checkpoints: Vec<(&'a str, &'a str, bool, &'a str)>,
    /// Streams to mark deleted, with the status that said so.
    pub gone: Vec<(&'a str, u16)>,
    /// Streams found through the registry.
    pub discovered: Vec<&'a str>,
}

/// Decides which reads of `batch` to apply, given each stream's stored `next_offset`.
///
/// Reads of one stream must chain (`start == previous next`). Reads that end at or before the
/// stored checkpoint were committed by an earlier attempt whose COMMIT we could not confirm
/// (the connection died), so they are skipped; anything else that disagrees with the checkpoint
/// is an error, never a guess.
pub fn reconcile<'a>(
    batch: &'a [Update],
    stored: &HashMap<String, String>,
) -> Result<Plan<'a>, ReconcileError> {
    let mut plan = Plan::default();
    // Per stream, the reads in batch order.
    let mut per_stream: Vec<(&'a str, Vec<&'a Read>)> = Vec::new();
    let mut index: HashMap<&'a str, usize> = HashMap::new();
    for update in batch {
        match update {
            Update::Read(read) => {
                let slot = *index.entry(&read.stream).or_insert_with(|| {
                    per_stream.push((&read.stream, Vec::new()));
                    per_stream.len() - 1
                });
                let reads = &mut per_stream[slot].1;
                if let Some(previous) = reads.last()
                    && previous.next_offset != read.start_offset
                {
                    return Err(ReconcileError::NotContiguous {
                        stream: read.stream.to_string(),
                        previous_next: previous.next_offset.clone(),
                        start: read.start_offset.clone(),
                    });
                }
                reads.push(read);
            }
            Update::Gone { stream, status } => plan.gone.push((stream, *status)),
        }
    }
    for (stream, reads) in per_stream {
        let stored_next = stored
            .get(stream)
            .ok_or_else(|| ReconcileError::MissingCheckpoint {
                stream: stream.to_owned(),
            })?;
        let (Some(first), Some(last)) = (reads.first(), reads.last()) else {
            continue;
        };
        let from = if let Some(i) = reads.iter().position(|r| &r.start_offset == stored_next) {
            i
        } else if let Some(i) = reads.iter().position(|r| &r.next_offset == stored_next) {
            i + 1
        } else {
            return Err(ReconcileError::CheckpointMoved {
                stream: stream.to_owned(),
                stored: stored_next.clone(),
                first_start: first.start_offset.clone(),
                last_next: last.next_offset.clone(),
            });
        };
        let pending = &reads[from..];
        if let Some(last) = pending.last() {
            let closed = pending.iter().any(|r| r.closed);
            plan.checkpoints
                .push((stream, &last.next_offset, closed, &last.content_type));
            for read in pending {
                plan.discovered
                    .extend(read.discovered.iter().map(String::as_str));
            }
            plan.reads.extend_from_slice(pending);
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(stream: &str, start: &str, next: &str, rows: usize) -> Update {
        Update::Read(Read {
            stream: stream.into(),
            content_type: "application/octet-stream".into(),
            start_offset: start.into(),
            next_offset: next.into(),
            rows: (0..rows)
                .map(|_| Row::Bytes(Bytes::from_static(b"x")))
                .collect(),
            closed: false,
            received_at: SystemTime::UNIX_EPOCH,
            discovered: Vec::new(),
            budget: None,
        })
    }

    fn stored(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(s, o)| (s.to_string(), o.to_string()))
            .collect()
    }

    fn starts(plan: &Plan<'_>) -> Vec<(String, String)> {
        plan.reads
            .iter()
            .map(|r| (r.stream.to_string(), r.start_offset.clone()))
            .collect()
    }

    #[test]
    fn fresh_batch_applies_every_read_and_moves_each_checkpoint_to_its_last_read() {
        let batch = vec![
            read("/a", "-1", "1", 2),
            read("/b", "5", "6", 1),
            read("/a", "1", "2", 1),
        ];
        let plan = reconcile(&batch, &stored(&[("/a", "-1"), ("/b", "5")]));
        let plan = plan.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(starts(&plan).len(), 3);
        assert_eq!(
            plan.checkpoints
                .iter()
                .map(|c| (c.0, c.1))
                .collect::<Vec<_>>(),
            vec![("/a", "2"), ("/b", "6")]
        );
    }

    #[test]
    fn retry_after_an_unconfirmed_commit_applies_nothing_twice() {
        let batch = vec![read("/a", "-1", "1", 2), read("/a", "1", "2", 1)];
        // The first attempt committed: the checkpoint already sits at the batch's end.
        let plan = reconcile(&batch, &stored(&[("/a", "2")])).unwrap_or_else(|e| panic!("{e}"));
        assert!(plan.reads.is_empty());
        assert!(plan.checkpoints.is_empty());
        // A checkpoint in the middle of the batch: only the rest applies.
        let plan = reconcile(&batch, &stored(&[("/a", "1")])).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(starts(&plan), vec![("/a".to_string(), "1".to_string())]);
    }

    #[test]
    fn a_checkpoint_outside_the_batch_is_an_error_not_a_guess() {
        let batch = vec![read("/a", "3", "4", 1)];
        let err = reconcile(&batch, &stored(&[("/a", "1")])).err();
        assert!(matches!(err, Some(ReconcileError::CheckpointMoved { .. })));
        let err = reconcile(&batch, &stored(&[])).err();
        assert!(matches!(
            err,
            Some(ReconcileError::MissingCheckpoint { .. })
        ));
    }

    #[test]
    fn a_gap_between_reads_of_one_stream_is_an_error() {
        let batch = vec![read("/a", "-1", "1", 1), read("/a", "2", "3", 1)];
        let err = reconcile(&batch, &stored(&[("/a", "-1")])).err();
        assert!(matches!(err, Some(ReconcileError::NotContiguous { .. })));
    }
}
