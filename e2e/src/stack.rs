//! The deployed shape on loopback: ds-server serving TLS, Envoy with the e2e config (TLS, JWT) in
//! front of it, and optionally Postgres with ds-sync following the streams through Envoy, as
//! compose.yaml wires them (ds-sync there talks to ds-server directly; here it goes through the
//! edge with a bearer token, so every hop a client's write takes is exercised).
//!
//! Owns only wiring and crash handles. If a test panics while a stack is alive, the stack prints
//! the tail of every component's log on drop, so a failure says what the processes saw.

use std::time::Duration;

use crate::envoy::{Envoy, EnvoyMode};
use crate::postgres::Postgres;
use crate::server::{DsServer, ServerOptions};
use crate::sync::{DsSync, SyncOptions};
use crate::tls;
use crate::token::{TokenKind, mint};

/// Log lines of each component shown when a test fails.
const FAILURE_LOG_LINES: usize = 60;

/// ds-server behind Envoy, and ds-sync once [`EdgeStack::start_sync`] ran.
// Field order is drop order: the worker stops before what it reads from and writes to, and the
// work dir goes last, after every process that logs into it.
pub struct EdgeStack {
    pub sync: Option<DsSync>,
    pub envoy: Envoy,
    pub server: DsServer,
    /// Present after [`EdgeStack::start_sync`]; the database lives as long as the stack.
    pub postgres: Option<Postgres>,
    /// A valid token for the default subject: what clients and ds-sync present to Envoy.
    pub token: String,
    /// Trusts only the test CA; 30 s per request.
    pub client: reqwest::Client,
    /// Logs, the server's data dir and Envoy's rendered config; deleted with the stack unless
    /// `DS_E2E_KEEP_WORK` is set.
    pub work: tempfile::TempDir,
}

impl EdgeStack {
    /// Starts ds-server with `server_options` (TLS is forced on: Envoy's e2e config speaks TLS
    /// upstream) and Envoy in front of it; returns once both answer.
    pub async fn start(mut server_options: ServerOptions) -> anyhow::Result<Self> {
        server_options.tls = true;
        let work = tempfile::Builder::new()
            .prefix("ds-e2e-stack-")
            // DS_E2E_KEEP_WORK=1 keeps logs and data for a look after the test.
            .disable_cleanup(std::env::var_os("DS_E2E_KEEP_WORK").is_some())
            .tempdir()?;
        let server = DsServer::start(server_options, work.path()).await?;
        let envoy = Envoy::start(EnvoyMode::Authenticated, server.port, work.path()).await?;
        Ok(Self {
            sync: None,
            envoy,
            server,
            postgres: None,
            token: mint(TokenKind::Valid)?,
            client: tls::client()?,
            work,
        })
    }

    /// The client-facing URL: Envoy's TLS listener.
    pub fn edge_url(&self) -> String {
        self.envoy.base_url()
    }

    /// Creates a fresh database (see [`Postgres::start`]) and starts ds-sync following `streams`
    /// through Envoy with [`EdgeStack::token`]. `extra_env` adds `DS_SYNC__*` settings.
    pub async fn start_sync(
        &mut self,
        streams: &str,
        extra_env: Vec<(String, String)>,
    ) -> anyhow::Result<()> {
        self.start_sync_on(Postgres::start().await?, streams, extra_env)
            .await
    }

    /// [`EdgeStack::start_sync`] on a given Postgres, e.g. a local cluster a test may crash.
    pub async fn start_sync_on(
        &mut self,
        postgres: Postgres,
        streams: &str,
        extra_env: Vec<(String, String)>,
    ) -> anyhow::Result<()> {
        let options = self.sync_options(&postgres, streams, extra_env);
        self.postgres = Some(postgres);
        self.sync = Some(DsSync::start(&options, self.work.path()).await?);
        Ok(())
    }

    /// [`EdgeStack::start_sync`] without waiting for ds-sync to be ready (its credentials may be
    /// refused on purpose).
    pub async fn spawn_sync(
        &mut self,
        streams: &str,
        extra_env: Vec<(String, String)>,
    ) -> anyhow::Result<()> {
        let postgres = Postgres::start().await?;
        let options = self.sync_options(&postgres, streams, extra_env);
        self.postgres = Some(postgres);
        self.sync = Some(DsSync::spawn(&options, self.work.path())?);
        Ok(())
    }

    /// ds-sync through Envoy; with [`EdgeStack::token`] unless `extra_env` names credentials.
    fn sync_options(
        &self,
        postgres: &Postgres,
        streams: &str,
        extra_env: Vec<(String, String)>,
    ) -> SyncOptions {
        let names_credentials = extra_env
            .iter()
            .any(|(k, _)| k == "DS_SYNC__BEARER_TOKEN" || k == "DS_SYNC__TOKEN_FILE");
        let mut env = Vec::new();
        if !names_credentials {
            env.push(("DS_SYNC__BEARER_TOKEN".to_owned(), self.token.clone()));
        }
        env.extend(extra_env);
        SyncOptions {
            database_url: postgres.url.clone(),
            server_url: self.edge_url(),
            streams: streams.to_owned(),
            extra_env: env,
        }
    }

    /// The Postgres ds-sync writes into (to crash it, when the harness owns it).
    pub fn postgres_mut(&mut self) -> anyhow::Result<&mut Postgres> {
        self.postgres
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no Postgres: call start_sync first"))
    }

    /// The database ds-sync writes into.
    pub fn database_url(&self) -> anyhow::Result<&str> {
        self.postgres
            .as_ref()
            .map(|pg| pg.url.as_str())
            .ok_or_else(|| anyhow::anyhow!("no Postgres: call start_sync first"))
    }

    /// A client with a whole-request timeout of `timeout` (for reads held open longer than the
    /// default 30 s client).
    pub fn client_with_timeout(&self, timeout: Duration) -> anyhow::Result<reqwest::Client> {
        Ok(tls::client_builder()?.timeout(timeout).build()?)
    }

    /// The tail of every component's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = format!(
            "--- ds-server log ---\n{}\n--- envoy log ---\n{}\n",
            self.server.log_tail(FAILURE_LOG_LINES),
            self.envoy.log_tail(FAILURE_LOG_LINES)
        );
        if let Some(sync) = &self.sync {
            out.push_str(&format!(
                "--- ds-sync log ---\n{}\n",
                sync.log_tail(FAILURE_LOG_LINES)
            ));
        }
        out
    }
}

impl Drop for EdgeStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "component logs (work dir {}):\n{}",
                self.work.path().display(),
                self.log_tails()
            );
        }
    }
}
