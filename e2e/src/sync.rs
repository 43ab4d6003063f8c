//! The real `ds-sync` binary: `ds-sync migrate` to completion, then `ds-sync run` as a managed
//! process, the same two commands compose.yaml runs.

use std::path::Path;

use crate::fixtures;
use crate::process::{ManagedProcess, ProcessSpec, run_to_completion};

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
}

impl DsSync {
    /// Runs `ds-sync migrate`, then starts `ds-sync run`. Logs go to `work_dir`.
    pub fn start(options: &SyncOptions, work_dir: &Path) -> anyhow::Result<Self> {
        let binary = fixtures::binary("ds-sync")?;
        let mut base = ProcessSpec::new("ds-sync", binary)
            .env("DATABASE_URL", &options.database_url)
            .env("DS_SYNC__SERVER_URL", &options.server_url)
            .env("DS_SYNC__STREAMS", &options.streams);
        for (key, value) in &options.extra_env {
            base = base.env(key, value);
        }
        let mut migrate = base.clone().arg("migrate");
        migrate.name = "ds-sync-migrate".to_owned();
        run_to_completion(&migrate, work_dir)?;
        let process = ManagedProcess::start(base.arg("run"), work_dir)?;
        Ok(Self { process })
    }

    /// kill -9.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// kill -9 and `ds-sync run` again (it resumes from its Postgres checkpoints).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()
    }

    /// Fails with the log tail if `ds-sync run` has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
