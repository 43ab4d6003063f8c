//! Child processes a test owns: started with an exact environment, killed with SIGKILL, restarted
//! with the same command line, and never left behind (killed on drop).

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// Everything needed to (re)start one process the same way.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Short name used in log file names and error messages (`envoy`, `ds-server`).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set on top of the inherited environment, after every inherited `DS_*` variable is removed:
    /// ds-server and ds-sync reject unknown `DS_*` keys, and the test runner's own `DS_E2E_*`
    /// settings must not leak into them.
    pub env: Vec<(OsString, OsString)>,
}

impl ProcessSpec {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    fn command(&self, log: &File) -> std::io::Result<Command> {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DS_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        Ok(command)
    }
}

/// A running (or deliberately killed) child process.
#[derive(Debug)]
pub struct ManagedProcess {
    spec: ProcessSpec,
    /// `None` after [`ManagedProcess::kill`], until [`ManagedProcess::start_again`].
    child: Option<Child>,
    /// stdout and stderr of every run, appended, so a failing test can show what happened.
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Starts `spec`, logging to `<log_dir>/<name>.log`.
    pub fn start(spec: ProcessSpec, log_dir: &Path) -> anyhow::Result<Self> {
        let log_path = log_dir.join(format!("{}.log", spec.name));
        let mut process = Self {
            spec,
            child: None,
            log_path,
        };
        process.start_again()?;
        Ok(process)
    }

    /// Starts the same command again (after [`ManagedProcess::kill`]); a no-op while running.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open log {}", self.log_path.display()))?;
        let child = self
            .spec
            .command(&log)
            .and_then(|mut command| command.spawn())
            .with_context(|| {
                format!("spawn {} ({})", self.spec.name, self.spec.program.display())
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap: the crash the e2e tests inflict. No graceful shutdown runs.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // kill() fails only if the child already exited; reaping it below covers both cases.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("reap {}", self.spec.name))?;
        }
        Ok(())
    }

    /// Kill -9 and start the same command again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.start_again()
    }

    /// Whether the child is alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Fails with the log tail if the process has exited: readiness waits call this so that a
    /// crash at start-up is reported at once, with its reason, instead of as a timeout.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            anyhow::bail!(
                "{} exited; last log lines:\n{}",
                self.spec.name,
                self.log_tail(40)
            )
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the process log (empty if unreadable).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl ManagedProcess {
    /// Polls `GET url` until it answers 2xx, failing early (with the reason) if the process
    /// exits, and after `deadline` otherwise.
    pub async fn wait_http_ok(
        &mut self,
        what: &str,
        deadline: std::time::Duration,
        client: &reqwest::Client,
        url: &str,
    ) -> anyhow::Result<()> {
        crate::wait::wait_until(what, deadline, || {
            let alive = self.ensure_running();
            let request = client.get(url).send();
            async move {
                alive?;
                Ok(request.await?.status().is_success().then_some(()))
            }
        })
        .await
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Runs `spec` to completion (e.g. `ds-sync migrate`), failing with its output if it fails.
pub fn run_to_completion(spec: &ProcessSpec, log_dir: &Path) -> anyhow::Result<()> {
    let log_path = log_dir.join(format!("{}.log", spec.name));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open log {}", log_path.display()))?;
    let status = spec
        .command(&log)
        .and_then(|mut command| command.status())
        .with_context(|| format!("run {} ({})", spec.name, spec.program.display()))?;
    if !status.success() {
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        anyhow::bail!("{} failed with {status}:\n{output}", spec.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_then_start_again_runs_a_new_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ProcessSpec::new("sleeper", "sleep").arg("600");
        let mut process = ManagedProcess::start(spec, dir.path()).expect("start sleep");
        let first = process.pid().expect("pid");
        assert!(process.is_running());
        process.kill().expect("kill");
        assert!(!process.is_running());
        assert!(process.ensure_running().is_err());
        process.start_again().expect("restart");
        assert!(process.is_running());
        assert_ne!(process.pid(), Some(first));
    }

    #[test]
    fn inherited_ds_variables_do_not_reach_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The test binary itself runs with CARGO_* but no DS_* variables, so set one on the spec and
        // check that only the spec's variables appear.
        let spec = ProcessSpec::new("env", "sh")
            .arg("-c")
            .arg("env | grep '^DS_' | sort")
            .env("DS_SERVER__PORT", "1234");
        run_to_completion(&spec, dir.path()).expect("run env");
        let output = std::fs::read_to_string(dir.path().join("env.log")).expect("log");
        assert_eq!(output.trim(), "DS_SERVER__PORT=1234");
    }

    #[test]
    fn a_failing_command_reports_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ProcessSpec::new("fails", "sh")
            .arg("-c")
            .arg("echo boom-reason >&2; exit 3");
        let error = run_to_completion(&spec, dir.path()).expect_err("exit 3");
        assert!(format!("{error:#}").contains("boom-reason"), "{error:#}");
    }
}
