//! The worker's own HTTP endpoints: `/healthz` (the process answers), `/readyz` (Postgres is
//! reachable and every migration is applied) and `/status` (throughput and per-stream lag as
//! JSON). Nothing here changes state.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

#[derive(Clone)]
struct HealthState {
    pool: Pool,
    status: Arc<Status>,
}

pub fn router(pool: Pool, status: Arc<Status>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .with_state(HealthState { pool, status })
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    match crate::db::check_ready(&state.pool).await {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")),
    }
}

async fn status_json(State(state): State<HealthState>) -> impl IntoResponse {
    Json(state.status.snapshot())
}

/// Serves the router on `listener` until shutdown.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
