//! The worker's own HTTP endpoints: `/healthz` (the process answers), `/readyz` (Postgres is
//! reachable, every migration is applied, and the server has not refused the credentials several
//! times in a row) and `/status` (throughput and per-stream lag as
//! JSON). Nothing here changes state.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::status::Status;

#[derive(Clone)]
struct HealthState {
    pool: Pool,
    status: Arc<Status>,
    credentials: Arc<Credentials>,
}

pub fn router(pool: Pool, status: Arc<Status>, credentials: Arc<Credentials>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .with_state(HealthState {
            pool,
            status,
            credentials,
        })
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    if let Err(e) = crate::db::check_ready(&state.pool).await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}"));
    }
    match state.credentials.readiness() {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
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
