//! The Postgres write path: batches reads by size and time, and commits each batch's rows and
//! checkpoints in one transaction, retrying with backoff until it lands.
//!
//! It owns the only place rows and checkpoints change once the worker runs. A batch is kept in
//! memory until its commit is confirmed; if the connection dies during COMMIT, the retry reads the
//! checkpoints under `FOR UPDATE` and `batch::reconcile` drops what already landed, so nothing is
//! applied twice.
//! It must never drop a batch: the only ways out are a confirmed commit, shutdown (the reads are
//! re-read from the checkpoints on restart) or a fatal error that stops the worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::batch::{self, Checkpoint, Notice, ReconcileError, Row, Update};
use crate::status::Status;
use crate::subscription::AckBook;

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
}

impl WriteError {
    /// Errors a retry cannot fix: the stored checkpoints disagree with what we read.
    fn is_fatal(&self) -> bool {
        matches!(self, WriteError::Reconcile(_))
    }
}

/// Limits of one batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub rows: usize,
    pub bytes: usize,
    pub linger: Duration,
}

/// Who hears of a committed batch.
pub struct AfterCommit {
    /// What the worker must do about it (follow a stream, stop one).
    pub notices: mpsc::UnboundedSender<Notice>,
    /// The checkpoints it committed, to be acked to the server (with a subscription).
    pub acks: Option<Arc<AckBook>>,
}

/// Receives updates from every follower and commits them in batches until `shutdown` or until
/// all followers are gone. What the worker must do about a committed batch (follow a discovered
/// or re-created stream, stop an ended one) goes to `notices` after its commit.
pub async fn run(
    pool: Pool,
    mut updates: mpsc::Receiver<Update>,
    after: AfterCommit,
    limits: BatchLimits,
    backoff: Backoff,
    status: Arc<Status>,
    shutdown: CancellationToken,
) -> Result<(), WriteError> {
    let AfterCommit { notices, acks } = after;
    let mut batch: Vec<Update> = Vec::new();
    loop {
        // Wait for the first update of a batch, then fill it until a limit or the linger time.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            update = updates.recv() => update,
        };
        let Some(first) = first else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + limits.linger;
        let (mut rows, mut bytes) = (0usize, 0usize);
        let mut push = |batch: &mut Vec<Update>, update: Update| {
            if let Update::Read(r) = &update {
                rows += r.rows.len();
                bytes += r.payload_bytes();
            }
            batch.push(update);
            rows >= limits.rows || bytes >= limits.bytes
        };
        let mut full = push(&mut batch, first);
        while !full {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                update = updates.recv() => update,
            };
            match next {
                Some(update) => full = push(&mut batch, update),
                None => break,
            }
        }
        let (committed, checkpoints) =
            commit_with_retry(&pool, &batch, backoff.clone(), &status, &shutdown).await?;
        // Only now, after COMMIT: what the server is told is in Postgres.
        if let Some(book) = &acks {
            book.committed(checkpoints);
        }
        for notice in committed {
            // The receiver only goes away at shutdown; what the notices say is committed already.
            let _ = notices.send(notice);
        }
        batch.clear();
    }
}

/// A committed checkpoint to ack: path, stream id, next offset.
type Committed = (String, String, String);

/// Commits `batch`, retrying until it lands; returns its notices and the checkpoints it
/// committed (none if shutdown came first).
async fn commit_with_retry(
    pool: &Pool,
    batch: &[Update],
    mut backoff: Backoff,
    status: &Status,
    shutdown: &CancellationToken,
) -> Result<(Vec<Notice>, Vec<Committed>), WriteError> {
    // An attempt whose COMMIT failed may have landed anyway; the retry then finds nothing left to
    // apply and no notice to give, so the notices of the attempt that planned them are kept.
    // Every attempt that plans any plans the same ones (they come from the same stored state),
    // and acting on a notice twice does nothing.
    let mut notices = Vec::new();
    let mut checkpoints = Vec::new();
    loop {
        let attempt = std::time::Instant::now();
        let committed = commit(pool, batch, &mut notices, &mut checkpoints).await;
        crate::metrics::pg_transaction(attempt.elapsed());
        match committed {
            Ok(outcome) => {
                status.committed(batch, &outcome.applied, outcome.rows);
                if outcome.stale > 0 {
                    tracing::debug!(
                        stale = outcome.stale,
                        "dropped updates of incarnations that had ended"
                    );
                }
                if outcome.fenced > 0 {
                    tracing::warn!(
                        fenced = outcome.fenced,
                        "dropped reads of another stream than their incarnation's (Stream-Id); their incarnations ended"
                    );
                }
                return Ok((notices, checkpoints));
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, updates = batch.len(), "batch commit failed; rolled back, will retry");
                status.commit_failed();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok((Vec::new(), Vec::new())),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// What one committed attempt did.
struct Outcome {
    rows: usize,
    /// Positions in the batch of the updates that took effect.
    applied: Vec<usize>,
    /// Updates of incarnations that had ended, dropped.
    stale: usize,
    /// Reads of another stream than their incarnation's, dropped.
    fenced: usize,
}

/// One attempt: lock the checkpoints, apply what is not applied yet, commit. Its notices go to
/// `notices` and the checkpoints it writes to `checkpoints` before COMMIT is sent, so that they
/// survive a COMMIT with an unknown outcome (the retry then finds nothing left to write).
async fn commit(
    pool: &Pool,
    batch: &[Update],
    notices: &mut Vec<Notice>,
    checkpoints: &mut Vec<Committed>,
) -> Result<Outcome, WriteError> {
    let mut client = pool.get().await?;
    // Dropping the transaction without commit rolls it back.
    let tx = client.transaction().await?;

    // Every path the batch may change: the streams read, and the paths the registry announced.
    let mut paths: Vec<&str> = Vec::with_capacity(batch.len());
    for update in batch {
        paths.push(update.stream());
        if let Update::Read(read) = update {
            paths.extend(read.announcements.iter().map(|a| a.path.as_str()));
        }
    }
    paths.sort_unstable();
    paths.dedup();
    // Sorted so that two workers locking overlapping sets cannot deadlock.
    let stored: HashMap<String, Checkpoint> = tx
        .query(
            &format!(
                "SELECT {} FROM ds_checkpoints WHERE stream = ANY($1) ORDER BY stream FOR UPDATE",
                crate::db::CHECKPOINT_COLUMNS
            ),
            &[&paths],
        )
        .await?
        .iter()
        .map(crate::db::checkpoint_row)
        .collect::<Result<_, tokio_postgres::Error>>()?;

    let plan = batch::reconcile(batch, &stored)?;
    if !plan.notices.is_empty() {
        notices.clone_from(&plan.notices);
    }

    let n: usize = plan.reads.iter().map(|r| r.rows.len()).sum();
    if n > 0 {
        let mut stream_col: Vec<&str> = Vec::with_capacity(n);
        let mut incarnation_col: Vec<i32> = Vec::with_capacity(n);
        let mut offset_col: Vec<&str> = Vec::with_capacity(n);
        let mut idx_col: Vec<i32> = Vec::with_capacity(n);
        let mut type_col: Vec<&str> = Vec::with_capacity(n);
        let mut data_col: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut bytes_col: Vec<Option<&[u8]>> = Vec::with_capacity(n);
        let mut received_col: Vec<SystemTime> = Vec::with_capacity(n);
        for read in &plan.reads {
            for (idx, row) in read.rows.iter().enumerate() {
                stream_col.push(&read.stream);
                incarnation_col.push(read.incarnation);
                offset_col.push(&read.start_offset);
                // A read holds at most `max_event_bytes` of payload, far below i32::MAX rows.
                idx_col.push(i32::try_from(idx).unwrap_or(i32::MAX));
                type_col.push(&read.content_type);
                match row {
                    Row::Json(text) if jsonb_can_hold(text) => {
                        data_col.push(Some(text));
                        bytes_col.push(None);
                    }
                    // Kept as its exact text rather than blocking the batch forever.
                    Row::Json(text) => {
                        data_col.push(None);
                        bytes_col.push(Some(text.as_bytes()));
                    }
                    Row::Bytes(b) => {
                        data_col.push(None);
                        bytes_col.push(Some(b));
                    }
                }
                received_col.push(read.received_at);
            }
        }
        // One statement for the whole batch: arrays in, unnest to rows. No ON CONFLICT: a
        // duplicate key means the checkpoint logic is wrong, and that must fail loudly.
        tx.execute(
            "INSERT INTO ds_messages \
               (stream, incarnation, stream_offset, idx, content_type, data, bytes, received_at) \
             SELECT s, n, o, i, c, d::jsonb, b, r \
             FROM unnest($1::text[], $2::int4[], $3::text[], $4::int4[], $5::text[], \
                         $6::text[], $7::bytea[], $8::timestamptz[]) AS u(s, n, o, i, c, d, b, r)",
            &[
                &stream_col,
                &incarnation_col,
                &offset_col,
                &idx_col,
                &type_col,
                &data_col,
                &bytes_col,
                &received_col,
            ],
        )
        .await?;
    }

    if !plan.checkpoints.is_empty() {
        // What an ack may say once this commits: positions of known stream instances.
        *checkpoints = plan
            .checkpoints
            .iter()
            .filter(|(_, cp)| !cp.deleted && cp.next_offset != crate::batch::START_OFFSET)
            .filter_map(|(path, cp)| {
                let id = cp.stream_id.as_ref()?;
                Some((path.to_string(), id.to_string(), cp.next_offset.clone()))
            })
            .collect();
        // The new row of every changed path, whole: the rows were read under FOR UPDATE (or did
        // not exist: a path the registry just announced), so nothing else moved them since.
        let cps = &plan.checkpoints;
        let stream: Vec<&str> = cps.iter().map(|c| c.0).collect();
        let incarnation: Vec<i32> = cps.iter().map(|c| c.1.incarnation).collect();
        let next: Vec<&str> = cps.iter().map(|c| c.1.next_offset.as_str()).collect();
        let content_type: Vec<Option<&str>> =
            cps.iter().map(|c| c.1.content_type.as_deref()).collect();
        let closed: Vec<bool> = cps.iter().map(|c| c.1.closed).collect();
        let deleted: Vec<bool> = cps.iter().map(|c| c.1.deleted).collect();
        let deleted_status: Vec<Option<i16>> = cps.iter().map(|c| c.1.deleted_status).collect();
        let stream_id: Vec<Option<&str>> = cps.iter().map(|c| c.1.stream_id.as_deref()).collect();
        tx.execute(
            "INSERT INTO ds_checkpoints AS c \
               (stream, incarnation, next_offset, content_type, closed, deleted, deleted_status, \
                stream_id, updated_at) \
             SELECT s, n, o, ct, cl, d, ds, id, now() \
             FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::bool[], $6::bool[], \
                         $7::int2[], $8::text[]) AS u(s, n, o, ct, cl, d, ds, id) \
             ON CONFLICT (stream) DO UPDATE SET \
               incarnation = EXCLUDED.incarnation, next_offset = EXCLUDED.next_offset, \
               content_type = EXCLUDED.content_type, closed = EXCLUDED.closed, \
               deleted = EXCLUDED.deleted, deleted_status = EXCLUDED.deleted_status, \
               stream_id = EXCLUDED.stream_id, updated_at = now()",
            &[
                &stream,
                &incarnation,
                &next,
                &content_type,
                &closed,
                &deleted,
                &deleted_status,
                &stream_id,
            ],
        )
        .await?;
    }

    tx.commit().await?;
    Ok(Outcome {
        rows: n,
        applied: plan.applied,
        stale: plan.stale,
        fenced: plan.fenced,
    })
}

/// Whether Postgres `jsonb` accepts a JSON text: it refuses the escape `\u0000` (a NUL
/// character). A false "no" (the six characters inside an escaped backslash) only moves a
/// message to the `bytes` column, losslessly.
fn jsonb_can_hold(text: &str) -> bool {
    !text.contains("\\u0000")
}

#[cfg(test)]
mod jsonb_tests {
    use super::jsonb_can_hold;

    #[test]
    fn nul_escapes_are_routed_to_bytes() {
        assert!(jsonb_can_hold(r#"{"a":"b"}"#));
        assert!(!jsonb_can_hold(r#"{"a":"x\u0000y"}"#));
    }
}
