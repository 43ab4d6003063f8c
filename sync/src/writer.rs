//! The Postgres write path: batches reads by size and time, and commits each batch's rows and
//! checkpoints in one transaction, retrying with backoff until it lands.
//!
//! It owns the only place rows are written. A batch is kept in memory until its commit is
//! confirmed; if the connection dies during COMMIT, the retry reads the checkpoints under
//! `FOR UPDATE` and `batch::reconcile` drops what already landed, so nothing is applied twice.
//! It must never drop a batch: the only ways out are a confirmed commit, shutdown (the reads are
//! re-read from the checkpoints on restart) or a fatal error that stops the worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::batch::{self, ReconcileError, Row, Update};
use crate::status::Status;

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

/// Receives updates from every follower and commits them in batches until `shutdown` or until
/// all followers are gone. Discovered stream paths are passed to `discovered` after their commit.
pub async fn run(
    pool: Pool,
    mut updates: mpsc::Receiver<Update>,
    discovered: mpsc::UnboundedSender<String>,
    limits: BatchLimits,
    backoff: Backoff,
    status: Arc<Status>,
    shutdown: CancellationToken,
) -> Result<(), WriteError> {
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
        commit_with_retry(&pool, &batch, backoff.clone(), &status, &shutdown).await?;
        for update in batch.drain(..) {
            if let Update::Read(read) = update {
                for path in read.discovered {
                    // The receiver only goes away at shutdown; the paths are committed already.
                    let _ = discovered.send(path);
                }
            }
        }
    }
}

async fn commit_with_retry(
    pool: &Pool,
    batch: &[Update],
    mut backoff: Backoff,
    status: &Status,
    shutdown: &CancellationToken,
) -> Result<(), WriteError> {
    loop {
        match commit(pool, batch).await {
            Ok(rows) => {
                status.committed(batch, rows);
                return Ok(());
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, updates = batch.len(), "batch commit failed; rolled back, will retry");
                status.commit_failed();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One attempt: lock the checkpoints, apply what is not applied yet, commit. Returns rows inserted.
async fn commit(pool: &Pool, batch: &[Update]) -> Result<usize, WriteError> {
    let mut client = pool.get().await?;
    // Dropping the transaction without commit rolls it back.
    let tx = client.transaction().await?;

    let mut streams: Vec<&str> = batch.iter().map(|u| &**u.stream()).collect();
    streams.sort_unstable();
    streams.dedup();
    // Sorted so that two workers locking overlapping sets cannot deadlock.
    let stored: HashMap<String, String> = tx
        .query(
            "SELECT stream, next_offset FROM ds_checkpoints WHERE stream = ANY($1) \
             ORDER BY stream FOR UPDATE",
            &[&streams],
        )
        .await?
        .into_iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;

    let plan = batch::reconcile(batch, &stored)?;

    let mut rows = 0usize;
    if !plan.reads.is_empty() {
        let n: usize = plan.reads.iter().map(|r| r.rows.len()).sum();
        let mut stream_col: Vec<&str> = Vec::with_capacity(n);
        let mut offset_col: Vec<&str> = Vec::with_capacity(n);
        let mut idx_col: Vec<i32> = Vec::with_capacity(n);
        let mut type_col: Vec<&str> = Vec::with_capacity(n);
        let mut data_col: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut bytes_col: Vec<Option<&[u8]>> = Vec::with_capacity(n);
        let mut received_col: Vec<SystemTime> = Vec::with_capacity(n);
        for read in &plan.reads {
            for (idx, row) in read.rows.iter().enumerate() {
                stream_col.push(&read.stream);
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
        rows = n;
        if n > 0 {
            // One statement for the whole batch: arrays in, unnest to rows. No ON CONFLICT: a
            // duplicate key means the checkpoint logic is wrong, and that must fail loudly.
            tx.execute(
                "INSERT INTO ds_messages \
                   (stream, stream_offset, idx, content_type, data, bytes, received_at) \
                 SELECT s, o, i, c, d::jsonb, b, r \
                 FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], \
                             $6::bytea[], $7::timestamptz[]) AS u(s, o, i, c, d, b, r)",
                &[
                    &stream_col,
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
    }

    if !plan.discovered.is_empty() {
        tx.execute(
            "INSERT INTO ds_checkpoints (stream) SELECT unnest($1::text[]) \
             ON CONFLICT (stream) DO NOTHING",
            &[&plan.discovered],
        )
        .await?;
    }

    if !plan.checkpoints.is_empty() {
        let s: Vec<&str> = plan.checkpoints.iter().map(|c| c.0).collect();
        let n: Vec<&str> = plan.checkpoints.iter().map(|c| c.1).collect();
        let closed: Vec<bool> = plan.checkpoints.iter().map(|c| c.2).collect();
        let ct: Vec<&str> = plan.checkpoints.iter().map(|c| c.3).collect();
        tx.execute(
            "UPDATE ds_checkpoints c \
             SET next_offset = u.n, closed = c.closed OR u.closed, content_type = u.ct, \
                 updated_at = now() \
             FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[]) AS u(s, n, closed, ct) \
             WHERE c.stream = u.s",
            &[&s, &n, &closed, &ct],
        )
        .await?;
    }

    for (stream, status) in &plan.gone {
        tx.execute(
            "UPDATE ds_checkpoints SET deleted = true, deleted_status = $2, updated_at = now() \
             WHERE stream = $1",
            &[stream, &i16::try_from(*status).unwrap_or(i16::MAX)],
        )
        .await?;
    }

    tx.commit().await?;
    Ok(rows)
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
