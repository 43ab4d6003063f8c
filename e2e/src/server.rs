//! The real `ds-server` binary on a free loopback port, with its data dir and optional TLS.
//!
//! The environment is what compose.yaml sets (`DS_SERVER__HOST`, `DS_SERVER__PORT`,
//! `DS_STORAGE__MODE`, `DS_STORAGE__DATA_DIR`, `DS_TLS__CERT_PATH`, `DS_TLS__KEY_PATH`,
//! `DS_METRICS__ADDR`), with loopback and temp-dir values, less the few variables
//! [`COMPOSE_ONLY_ENV_KEYS`] names with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fixtures;
use crate::ports::{LOOPBACK, free_loopback_port};
use crate::process::{ManagedProcess, ProcessSpec};
use crate::tls;

/// The variables the harness sets; compose.yaml sets the same ones (checked by a test).
pub const SERVER_ENV_KEYS: [&str; 7] = [
    "DS_SERVER__HOST",
    "DS_SERVER__PORT",
    "DS_STORAGE__MODE",
    "DS_STORAGE__DATA_DIR",
    "DS_TLS__CERT_PATH",
    "DS_TLS__KEY_PATH",
    "DS_METRICS__ADDR",
];

/// What compose.yaml's ds-server sets and the harness does not (a test keeps the two lists and
/// compose.yaml's environment equal), each with why.
pub const COMPOSE_ONLY_ENV_KEYS: [(&str, &str); 3] = [
    (
        "DS_SERVER__SHUTDOWN_TIMEOUT",
        "the harness stops the server with SIGKILL, never a drain",
    ),
    // compose.yaml runs the hot buffer (README *Running the stack as a hot buffer*). The harness
    // keeps the server's default, `keep`: its tests read whole streams back from the server after
    // ds-sync mirrored them. e2e/compose/run.sh checks the buffered stack under kill -9, and
    // server/tests/retention.rs the release rules; a test may still pass these in `extra_env`.
    (
        "DS_RETENTION__MODE",
        "tests read whole streams back after ds-sync acked them",
    ),
    (
        "DS_RETENTION__MIN_AGE",
        "only meaningful with DS_RETENTION__MODE=acked",
    ),
];

/// Start-up includes recovering a file-durable store after kill -9.
const HEALTHY_DEADLINE: Duration = Duration::from_secs(60);

/// How to start ds-server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `memory`, `file-fast`, `file-durable` or `acid`.
    pub storage_mode: String,
    /// Serve HTTPS with `fixtures/server.pem` (the Envoy-to-server hop), else plain HTTP.
    pub tls: bool,
    /// Further `DS_*` variables, e.g. a short long-poll timeout for the conformance suite.
    pub extra_env: Vec<(String, String)>,
}

impl Default for ServerOptions {
    /// What compose runs: file-durable, TLS.
    fn default() -> Self {
        Self {
            storage_mode: "file-durable".to_owned(),
            tls: true,
            extra_env: Vec::new(),
        }
    }
}

/// A running ds-server. Its port and data dir survive [`DsServer::restart`].
#[derive(Debug)]
pub struct DsServer {
    process: ManagedProcess,
    pub port: u16,
    /// `DS_METRICS__ADDR`'s port: Prometheus metrics, plain HTTP on loopback.
    pub metrics_port: u16,
    pub tls: bool,
    pub data_dir: PathBuf,
    client: reqwest::Client,
}

impl DsServer {
    /// Starts ds-server with `options`, its data in `<work_dir>/server-data`, and waits until
    /// `GET /healthz` answers 200.
    pub async fn start(options: ServerOptions, work_dir: &Path) -> anyhow::Result<Self> {
        let port = free_loopback_port()?;
        let metrics_port = free_loopback_port()?;
        let data_dir = work_dir.join("server-data");
        std::fs::create_dir_all(&data_dir)?;
        let [host, port_key, mode, data, cert, key, metrics] = SERVER_ENV_KEYS;
        let mut spec = ProcessSpec::new("ds-server", fixtures::binary("ds-server")?)
            .env(host, LOOPBACK.to_string())
            .env(port_key, port.to_string())
            .env(mode, &options.storage_mode)
            .env(data, &data_dir)
            .env(metrics, format!("{LOOPBACK}:{metrics_port}"));
        if options.tls {
            spec = spec
                .env(cert, fixtures::path("server.pem"))
                .env(key, fixtures::path("server-key.pem"));
        }
        for (key, value) in &options.extra_env {
            spec = spec.env(key, value);
        }
        let client = tls::client_builder()?
            .timeout(Duration::from_secs(2))
            .build()?;
        let process = ManagedProcess::start(spec, work_dir)?;
        let mut server = Self {
            process,
            port,
            metrics_port,
            tls: options.tls,
            data_dir,
            client,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    /// `https://127.0.0.1:<port>` or `http://...`. The server certificate carries IP 127.0.0.1.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{LOOPBACK}:{}", self.port)
    }

    /// `GET /metrics` on the metrics listener: the Prometheus text.
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

    pub async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.base_url());
        self.process
            .wait_http_ok("ds-server /healthz", HEALTHY_DEADLINE, &self.client, &url)
            .await
    }

    /// The running process's id (`None` after [`DsServer::kill`]): for `/proc/<pid>/status`.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// kill -9.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// kill -9, start again on the same port and data dir, wait until healthy.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        self.wait_healthy().await
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn compose_sets_the_variables_the_harness_sets_and_the_listed_others_only() {
        let service = crate::compose_file::service("ds-server");
        let compose: BTreeSet<String> = service.env().into_iter().map(|(k, _)| k).collect();
        let harness: BTreeSet<String> = SERVER_ENV_KEYS
            .into_iter()
            .chain(COMPOSE_ONLY_ENV_KEYS.map(|(key, _)| key))
            .map(str::to_owned)
            .collect();
        assert_eq!(
            compose, harness,
            "compose.yaml's ds-server environment against SERVER_ENV_KEYS and COMPOSE_ONLY_ENV_KEYS"
        );
        for key in SERVER_ENV_KEYS {
            service.env_var(key);
        }
        // What the harness's default runs is what compose runs.
        assert_eq!(
            service.env_var("DS_STORAGE__MODE"),
            ServerOptions::default().storage_mode
        );
        assert!(ServerOptions::default().tls);
        // The same certificate and key, at compose's mount point of fixtures/.
        assert_eq!(service.env_var("DS_TLS__CERT_PATH"), "/fixtures/server.pem");
        assert_eq!(
            service.env_var("DS_TLS__KEY_PATH"),
            "/fixtures/server-key.pem"
        );
        assert_eq!(service.command(), ["ds-server"]);
        // Metrics on a port of their own, which Envoy never routes to.
        let metrics = service.env_var("DS_METRICS__ADDR");
        assert!(metrics.ends_with(":9464"), "{metrics}");
        assert_ne!(
            metrics,
            format!("0.0.0.0:{}", service.env_var("DS_SERVER__PORT"))
        );
    }

    /// The hot buffer is compose's default, and the README's hot-buffer section says so with the
    /// same values: `acked`, released a `DS_RETENTION__MIN_AGE` after the ack.
    #[test]
    fn compose_runs_the_hot_buffer_the_readme_describes_by_default() {
        use crate::compose_file::default_from_environment;
        let service = crate::compose_file::service("ds-server");
        assert_eq!(service.env_var("DS_STORAGE__MODE"), "file-durable");
        let mode = service.env_var("DS_RETENTION__MODE");
        assert_eq!(
            default_from_environment(&mode, "DS_RETENTION__MODE"),
            "acked"
        );
        let min_age = service.env_var("DS_RETENTION__MIN_AGE");
        let min_age = default_from_environment(&min_age, "DS_RETENTION__MIN_AGE");
        let readme = std::fs::read_to_string(fixtures::workspace_root().join("README.md"))
            .expect("README.md");
        let section = readme
            .split("\n### Running the stack as a hot buffer\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README has the hot-buffer section");
        for setting in [
            "`DS_RETENTION__MODE=acked`".to_owned(),
            format!("`DS_RETENTION__MIN_AGE={min_age}`"),
        ] {
            assert!(
                section.contains(&setting),
                "the hot-buffer section does not give compose's default {setting}"
            );
        }
    }

    /// `docker compose stop` sends SIGTERM and, after stop_grace_period, SIGKILL: the server's
    /// drain (DS_SERVER__SHUTDOWN_TIMEOUT) must end well before that.
    #[test]
    fn compose_gives_the_server_longer_than_its_drain_before_sigkill() {
        use crate::compose_file::seconds;
        let service = crate::compose_file::service("ds-server");
        let drain = seconds(&service.env_var("DS_SERVER__SHUTDOWN_TIMEOUT"));
        let grace = seconds(service.string("stop_grace_period"));
        assert!(
            grace >= drain + 5,
            "stop_grace_period {grace}s leaves the {drain}s drain no margin"
        );
    }
}
