//! The real `ds-sync` binary: `ds-sync migrate` to completion, then `ds-sync run` as a managed
//! process, the same two commands compose.yaml runs.

use std::path::Path;
use std::time::Duration;

use crate::fixtures;
use crate::ports::{LOOPBACK, free_loopback_port};
use crate::process::{ManagedProcess, ProcessSpec, run_to_completion};

/// The variables the harness sets; compose.yaml's ds-sync sets the same ones (checked by a test).
pub const SYNC_ENV_KEYS: [&str; 6] = [
    "DATABASE_URL",
    "DS_SYNC__SERVER_URL",
    "DS_SYNC__STREAMS",
    "DS_SYNC__HEALTH_ADDR",
    "SSL_CERT_FILE",
    "DS_SYNC__METRICS_ADDR",
];

/// Start-up includes connecting to Postgres and checking migrations.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// How to start ds-sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `DS_SYNC__SERVER_URL`: ds-server directly, or Envoy.
    pub server_url: String,
    /// `DS_SYNC__STREAMS`, comma-separated; a trailing `*` is a prefix (`/v1/stream/*`).
    pub streams: String,
    /// Further `DS_SYNC__*` variables (e.g. a bearer token when going through Envoy).
    pub extra_env: Vec<(String, String)>,
}

/// A running `ds-sync run`.
#[derive(Debug)]
pub struct DsSync {
    process: ManagedProcess,
    /// `DS_SYNC__HEALTH_ADDR` port: `/healthz`, `/readyz`, `/status` (plain HTTP, loopback).
    pub health_port: u16,
    /// `DS_SYNC__METRICS_ADDR` port: Prometheus metrics (plain HTTP, loopback).
    pub metrics_port: u16,
    client: reqwest::Client,
}

impl DsSync {
    /// Runs `ds-sync migrate`, then starts `ds-sync run` and waits until `/readyz` answers 200.
    /// Logs go to `work_dir`.
    pub async fn start(options: &SyncOptions, work_dir: &Path) -> anyhow::Result<Self> {
        let mut sync = Self::spawn(options, work_dir)?;
        sync.wait_ready().await?;
        Ok(sync)
    }

    /// [`DsSync::start`] without waiting for `/readyz`: for a worker expected to be unready (its
    /// credentials refused).
    pub fn spawn(options: &SyncOptions, work_dir: &Path) -> anyhow::Result<Self> {
        let binary = fixtures::binary("ds-sync")?;
        let health_port = free_loopback_port()?;
        let metrics_port = free_loopback_port()?;
        let [database, server, streams, health, ca, metrics] = SYNC_ENV_KEYS;
        let mut base = ProcessSpec::new("ds-sync", binary)
            .env(database, &options.database_url)
            .env(server, &options.server_url)
            .env(streams, &options.streams)
            .env(health, format!("{LOOPBACK}:{health_port}"))
            .env(metrics, format!("{LOOPBACK}:{metrics_port}"))
            // Trust the test CA for an https:// server URL, as compose.yaml does: reqwest's rustls
            // verifier reads its roots from SSL_CERT_FILE when it is set.
            .env(ca, fixtures::path("ca.pem"))
            // A killed worker holds the subscription's lease until it lapses, and its restart
            // waits that long before it mirrors: short here, so restarts resume quickly.
            .env("DS_SYNC__LEASE_TTL", "3s");
        for (key, value) in &options.extra_env {
            base = base.env(key, value);
        }
        let mut migrate = base.clone().arg("migrate");
        migrate.name = "ds-sync-migrate".to_owned();
        run_to_completion(&migrate, work_dir)?;
        let process = ManagedProcess::start(base.arg("run"), work_dir)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        Ok(Self {
            process,
            health_port,
            metrics_port,
            client,
        })
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{LOOPBACK}:{}/metrics", self.metrics_port);
        Ok(self
            .client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// `GET /status`: the worker's counters and its streams (JSON).
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let url = format!("http://{LOOPBACK}:{}/status", self.health_port);
        Ok(self
            .client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// `GET /readyz`: its status and body.
    pub async fn readyz(&self) -> anyhow::Result<(u16, String)> {
        let url = format!("http://{LOOPBACK}:{}/readyz", self.health_port);
        let response = self.client.get(url).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// Polls `/readyz` until 200 (Postgres reachable, migrations applied).
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{LOOPBACK}:{}/readyz", self.health_port);
        self.process
            .wait_http_ok("ds-sync /readyz", READY_DEADLINE, &self.client, &url)
            .await
    }

    /// kill -9.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// The process id while it runs (to sample its memory from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// kill -9 and `ds-sync run` again (it resumes from its Postgres checkpoints); waits until
    /// ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        self.wait_ready().await
    }

    /// Fails with the log tail if `ds-sync run` has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_runs_ds_sync_as_the_harness_does() {
        let service = crate::compose_file::service("ds-sync");
        for key in SYNC_ENV_KEYS {
            service.env_var(key);
        }
        assert_eq!(service.env_var("SSL_CERT_FILE"), "/fixtures/ca.pem");
        // The harness's two steps: `ds-sync migrate` to completion, then `ds-sync run`.
        assert_eq!(
            service.command(),
            ["sh", "-c", "ds-sync migrate && exec ds-sync run"]
        );
        // The same image as ds-server, built once.
        assert_eq!(
            service.image(),
            crate::compose_file::service("ds-server").image()
        );
    }
}
