//! Postgres plumbing outside the hot path: the connection pool, the migrations (sqlx's migrator,
//! which takes an advisory lock so that several workers may start at once), the readiness check,
//! and the checkpoints the worker starts from. Once a stream is followed, only `writer` changes its
//! row.

use std::collections::BTreeSet;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::batch::{Checkpoint, Incarnation, START_OFFSET, StreamId};
use crate::config::{Config, ConfigError};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Why a database step failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("building the postgres pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("connecting to postgres to migrate: {0}")]
    MigrateConnect(sqlx::Error),
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("migrations not applied: {missing} of {total} missing (run `ds-sync migrate`)")]
    NotMigrated { missing: usize, total: usize },
}

/// The writer's pool. Connections that died (e.g. terminated by an admin) are detected when
/// used; the writer's retry handles the error.
pub fn pool(config: &Config) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        config.pg_config()?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(config.pg.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()?)
}

/// Applies pending migrations, holding sqlx's advisory lock while doing so.
pub async fn migrate(config: &Config) -> Result<(), DbError> {
    // A one-connection pool rather than a bare connection: the migrator's future is then Send,
    // so callers may spawn it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(config.sqlx_options()?)
        .await
        .map_err(DbError::MigrateConnect)?;
    let result = MIGRATOR.run(&pool).await;
    pool.close().await;
    Ok(result?)
}

/// Ready means: Postgres answers, and every embedded migration is recorded as applied.
pub async fn check_ready(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    let applied: BTreeSet<i64> = match client
        .query("SELECT version FROM _sqlx_migrations WHERE success", &[])
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?,
        // The table does not exist before the first migration.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            BTreeSet::new()
        }
        Err(e) => return Err(e.into()),
    };
    let total = MIGRATOR.iter().count();
    let missing = MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .count();
    if missing > 0 {
        return Err(DbError::NotMigrated { missing, total });
    }
    Ok(())
}

/// Where a follower starts: one incarnation of a stream and its checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    pub stream: String,
    pub incarnation: Incarnation,
    pub next_offset: String,
    pub content_type: Option<String>,
    /// The server's id of the incarnation's stream, once known.
    pub stream_id: Option<StreamId>,
}

const START_COLUMNS: &str = "stream, incarnation, next_offset, content_type, stream_id";

fn stream_start(row: &tokio_postgres::Row) -> Result<StreamStart, tokio_postgres::Error> {
    Ok(StreamStart {
        stream: row.try_get(0)?,
        incarnation: row.try_get(1)?,
        next_offset: row.try_get(2)?,
        content_type: row.try_get(3)?,
        stream_id: row.try_get(4)?,
    })
}

/// The columns [`checkpoint_row`] reads, in its order.
pub(crate) const CHECKPOINT_COLUMNS: &str = "stream, incarnation, next_offset, content_type, \
    closed, deleted, deleted_status, stream_id";

/// A `ds_checkpoints` row selected with [`CHECKPOINT_COLUMNS`]: its path and checkpoint.
pub(crate) fn checkpoint_row(
    row: &tokio_postgres::Row,
) -> Result<(String, Checkpoint), tokio_postgres::Error> {
    Ok((
        row.try_get(0)?,
        Checkpoint {
            incarnation: row.try_get(1)?,
            next_offset: row.try_get(2)?,
            content_type: row.try_get(3)?,
            closed: row.try_get(4)?,
            deleted: row.try_get(5)?,
            deleted_status: row.try_get(6)?,
            stream_id: row.try_get(7)?,
        },
    ))
}

/// Gives every `explicit` stream a checkpoint row (its first incarnation, from the start) unless
/// it has one.
pub async fn ensure_checkpoints(pool: &Pool, explicit: &[String]) -> Result<(), DbError> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO ds_checkpoints (stream) SELECT unnest($1::text[]) \
             ON CONFLICT (stream) DO NOTHING",
            &[&explicit],
        )
        .await?;
    Ok(())
}

/// Every stream to follow: the explicit ones and those under a `prefixes` entry, less closed or
/// deleted ones and less `exclude` (the registry, which has its own follower).
pub async fn followable_checkpoints(
    pool: &Pool,
    explicit: &[String],
    prefixes: &[String],
    exclude: &str,
) -> Result<Vec<StreamStart>, DbError> {
    let client = pool.get().await?;
    // `starts_with` rather than LIKE so that '%' and '_' in a prefix are literal.
    let rows = client
        .query(
            &format!(
                "SELECT {START_COLUMNS} FROM ds_checkpoints \
                 WHERE NOT closed AND NOT deleted AND stream <> $3 \
                   AND (stream = ANY($1) OR EXISTS \
                        (SELECT 1 FROM unnest($2::text[]) AS p WHERE starts_with(stream, p))) \
                 ORDER BY stream"
            ),
            &[&explicit, &prefixes, &exclude],
        )
        .await?;
    Ok(rows.iter().map(stream_start).collect::<Result<_, _>>()?)
}

/// The checkpoint of one stream, unless it is closed or deleted (then it is not followed).
pub async fn followable_checkpoint(
    pool: &Pool,
    stream: &str,
) -> Result<Option<StreamStart>, DbError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {START_COLUMNS} FROM ds_checkpoints \
                 WHERE stream = $1 AND NOT closed AND NOT deleted"
            ),
            &[&stream],
        )
        .await?;
    Ok(row.as_ref().map(stream_start).transpose()?)
}

/// The registry's checkpoint, created at the start of the registry when new.
pub async fn registry_checkpoint(pool: &Pool, registry: &str) -> Result<StreamStart, DbError> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO ds_checkpoints (stream, content_type) VALUES ($1, 'application/json') \
             ON CONFLICT (stream) DO NOTHING",
            &[&registry],
        )
        .await?;
    let row = client
        .query_one(
            &format!("SELECT {START_COLUMNS} FROM ds_checkpoints WHERE stream = $1"),
            &[&registry],
        )
        .await?;
    Ok(stream_start(&row)?)
}

/// Explicit streams no longer followed (closed or deleted), with their checkpoints: where no
/// registry is followed, the worker looks at each once on start, in case the path holds a new
/// stream now.
pub async fn ended_checkpoints(
    pool: &Pool,
    explicit: &[String],
) -> Result<Vec<(String, Checkpoint)>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {CHECKPOINT_COLUMNS} FROM ds_checkpoints \
                 WHERE stream = ANY($1) AND (closed OR deleted) ORDER BY stream"
            ),
            &[&explicit],
        )
        .await?;
    rows.iter().map(|r| Ok(checkpoint_row(r)?)).collect()
}

/// Starts the next incarnation of `stream` (at the stream's beginning, for `stream_id` when the
/// server named it) if its row is still at `incarnation` and not followed (closed or deleted);
/// returns where to follow it from. Only for streams no follower of this worker writes, so it
/// may bypass the writer.
pub async fn start_next_incarnation(
    pool: &Pool,
    stream: &str,
    incarnation: Incarnation,
    stream_id: Option<&str>,
) -> Result<Option<StreamStart>, DbError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "UPDATE ds_checkpoints SET incarnation = incarnation + 1, next_offset = $3, \
                   content_type = NULL, closed = false, deleted = false, deleted_status = NULL, \
                   stream_id = $4, updated_at = now() \
                 WHERE stream = $1 AND incarnation = $2 AND (closed OR deleted) \
                 RETURNING {START_COLUMNS}"
            ),
            &[&stream, &incarnation, &START_OFFSET, &stream_id],
        )
        .await?;
    Ok(row.as_ref().map(stream_start).transpose()?)
}
