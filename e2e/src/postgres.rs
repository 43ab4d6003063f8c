//! A Postgres for one test, from the first source that works:
//!
//! 1. `DATABASE_URL`: an existing server; the test gets a fresh database created in it.
//! 2. testcontainers, when a Docker engine answers (`DOCKER_HOST` or `/var/run/docker.sock`).
//! 3. A throwaway local cluster: `initdb` + `pg_ctl` in a temp dir on a free loopback port.
//! 4. Otherwise an error saying what to install.
//!
//! `DS_E2E_POSTGRES=testcontainers` makes testcontainers the only source, for every test,
//! including those that crash Postgres ([`Postgres::start_owned`]): CI runs the suite so once, where
//! a silent fallback would hide a broken container path.
//!
//! Every source can be asked to crash and come back ([`Postgres::kill`], [`Postgres::restart`]),
//! except an external `DATABASE_URL` server, which the harness does not own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::ports::{LOOPBACK, free_loopback_port};
use crate::wait::wait_until;

/// The Postgres image tag compose.yaml pins too; keep them equal.
pub const POSTGRES_IMAGE: &str = "postgres";
pub const POSTGRES_TAG: &str = "15.20";

/// Set to `testcontainers` to make that the only source (see the module docs).
pub const SOURCE_VAR: &str = "DS_E2E_POSTGRES";

/// Start-up (including crash recovery) must finish within this.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A Postgres a test can use, and own when the harness started it.
pub struct Postgres {
    /// Connection URL for the test's database (`postgres://user@127.0.0.1:port/db`).
    pub url: String,
    backend: Backend,
}

enum Backend {
    External,
    // Boxed: the container handle is large and the enum is moved around.
    Container(Box<ContainerAsync<GenericImage>>),
    LocalCluster(LocalCluster),
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.url)
            .field("source", &self.source())
            .finish()
    }
}

impl Postgres {
    /// The first source that works, in the order of the module docs.
    pub async fn start() -> anyhow::Result<Self> {
        if containers_required()? {
            return Self::start_container()
                .await
                .with_context(|| format!("{SOURCE_VAR}=testcontainers"));
        }
        let mut tried = Vec::new();
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Self::fresh_database_in(&url).await;
        }
        tried.push("DATABASE_URL is not set".to_owned());

        if docker_engine_reachable() {
            match Self::start_container().await {
                Ok(pg) => return Ok(pg),
                Err(error) => tried.push(format!("testcontainers failed: {error:#}")),
            }
        } else {
            tried.push("no Docker engine answers (DOCKER_HOST, /var/run/docker.sock)".to_owned());
        }

        match Self::start_local_cluster().await {
            Ok(pg) => return Ok(pg),
            Err(error) => tried.push(format!("local initdb/pg_ctl cluster failed: {error:#}")),
        }

        anyhow::bail!(
            "no Postgres for the e2e tests. Tried:\n  - {}\nFix one of: set DATABASE_URL to a \
             server the tests may create databases in; run a Docker engine; or install the \
             PostgreSQL server binaries (Debian: apt-get install postgresql) so initdb and pg_ctl \
             are on PATH or in /usr/lib/postgresql/<version>/bin",
            tried.join("\n  - ")
        )
    }

    /// A Postgres the harness owns, so that a test may crash it ([`Postgres::kill`]): a container
    /// under `DS_E2E_POSTGRES=testcontainers`, else a local initdb/pg_ctl cluster.
    pub async fn start_owned() -> anyhow::Result<Self> {
        if containers_required()? {
            Self::start_container()
                .await
                .with_context(|| format!("{SOURCE_VAR}=testcontainers"))
        } else {
            Self::start_local_cluster().await
        }
    }

    /// Which source this is, for logs.
    pub fn source(&self) -> &'static str {
        match self.backend {
            Backend::External => "DATABASE_URL",
            Backend::Container(_) => "testcontainers",
            Backend::LocalCluster(_) => "local initdb/pg_ctl cluster",
        }
    }

    /// A new, uniquely named database in the server at `admin_url`.
    pub async fn fresh_database_in(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!(
            "ds_e2e_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        );
        let client = connect(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("create database {name} via DATABASE_URL"))?;
        Ok(Self {
            url: with_database(admin_url, &name)?,
            backend: Backend::External,
        })
    }

    /// A `postgres:15` container with its port published on a fixed free port, so a restart
    /// comes back at the same URL.
    pub async fn start_container() -> anyhow::Result<Self> {
        let host_port = free_loopback_port()?;
        let container = GenericImage::new(POSTGRES_IMAGE, POSTGRES_TAG)
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_mapped_port(host_port, 5432.tcp())
            // Loopback only (Docker publishes on every interface by default): this Postgres
            // trusts every connection.
            .with_host_config_modifier(|host_config| {
                let bindings = host_config
                    .port_bindings
                    .iter_mut()
                    .flat_map(|ports| ports.values_mut());
                for binding in bindings.flatten().flatten() {
                    binding.host_ip = Some(LOOPBACK.to_string());
                }
            })
            .start()
            .await
            .context("start postgres container")?;
        let url = format!("postgres://postgres@{LOOPBACK}:{host_port}/postgres");
        wait_for_connection(&url).await?;
        Ok(Self {
            url,
            backend: Backend::Container(Box::new(container)),
        })
    }

    /// A throwaway cluster in a temp dir (fsync off: tests crash it deliberately, not the machine).
    pub async fn start_local_cluster() -> anyhow::Result<Self> {
        let cluster = tokio::task::spawn_blocking(LocalCluster::create)
            .await
            .context("local cluster task")??;
        let url = cluster.url();
        let pg = Self {
            url,
            backend: Backend::LocalCluster(cluster),
        };
        wait_for_connection(&pg.url).await?;
        Ok(pg)
    }

    /// Crash Postgres (SIGKILL of the postmaster / container stop without grace).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::External => anyhow::bail!("cannot kill a DATABASE_URL server"),
            Backend::Container(container) => Ok(container.stop_with_timeout(Some(0)).await?),
            Backend::LocalCluster(cluster) => cluster.kill(),
        }
    }

    /// Start again after [`Postgres::kill`] (crash recovery runs) and wait until it accepts
    /// connections at the same URL.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::External => anyhow::bail!("cannot restart a DATABASE_URL server"),
            Backend::Container(container) => container.start().await?,
            Backend::LocalCluster(cluster) => cluster.start()?,
        }
        wait_for_connection(&self.url).await
    }
}

/// A connected client; the connection task runs until the client is dropped.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        // Ends with an error when the server goes away, which crash tests do on purpose.
        let _ = connection.await;
    });
    Ok(client)
}

async fn wait_for_connection(url: &str) -> anyhow::Result<()> {
    wait_until("postgres accepting connections", READY_DEADLINE, || async {
        let client = connect(url).await?;
        client.simple_query("SELECT 1").await?;
        Ok(Some(()))
    })
    .await
}

/// Whether `DS_E2E_POSTGRES` asks for testcontainers only; any other value is refused.
fn containers_required() -> anyhow::Result<bool> {
    match std::env::var(SOURCE_VAR) {
        Ok(value) if value == "testcontainers" => Ok(true),
        Ok(value) => anyhow::bail!("{SOURCE_VAR}={value:?}: the only value is `testcontainers`"),
        Err(_) => Ok(false),
    }
}

fn docker_engine_reachable() -> bool {
    if std::env::var_os("DOCKER_HOST").is_some() {
        return true;
    }
    std::os::unix::net::UnixStream::connect("/var/run/docker.sock").is_ok()
}

/// `url` with its database replaced by `database` (URL form only).
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url
        .find("://")
        .context("DATABASE_URL must be a postgres:// URL, not key=value form")?
        + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    Ok(format!("{}/{database}{query}", &base[..authority_end]))
}

/// `initdb` + `pg_ctl` in a temp dir. Dropping it stops the server and deletes the directory.
struct LocalCluster {
    /// Owns the directory: data, socket and server log live here and vanish with the cluster.
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    port: u16,
    /// initdb refuses to run as root; as root the cluster runs as this user via `runuser`.
    run_as: Option<String>,
}

impl LocalCluster {
    fn create() -> anyhow::Result<Self> {
        let bin_dir = postgres_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("ds-e2e-pg-").tempdir()?;
        let run_as = if running_as_root()? {
            let user = "postgres";
            let uid = command_output("id", &["-u", user]).with_context(|| {
                format!("running as root, and initdb needs a non-root user; no `{user}` user")
            })?;
            let gid = command_output("id", &["-g", user])?;
            std::os::unix::fs::chown(
                dir.path(),
                Some(uid.trim().parse()?),
                Some(gid.trim().parse()?),
            )
            .context("chown cluster dir to postgres")?;
            Some(user.to_owned())
        } else {
            None
        };
        let cluster = Self {
            dir,
            bin_dir,
            port: free_loopback_port()?,
            run_as,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data_dir(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        cluster.start()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@{LOOPBACK}:{}/postgres", self.port)
    }

    fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-F -p {} -c listen_addresses={LOOPBACK} -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// SIGKILL the postmaster and every backend it forked, as a machine or container crash
    /// would; crash recovery runs on the next start. Returns once none of them exists, because a
    /// surviving backend keeps the shared memory that a new postmaster refuses to share.
    fn kill(&self) -> anyhow::Result<()> {
        let pid_file = Path::new(&self.data_dir()).join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("read {}", pid_file.display()))?;
        let postmaster: u32 = text
            .lines()
            .next()
            .context("empty postmaster.pid")?
            .trim()
            .parse()
            .context("postmaster.pid does not start with a pid")?;
        let mut victims = children_of(postmaster);
        victims.push(postmaster);
        let pids: Vec<String> = victims.iter().map(u32::to_string).collect();
        let mut args = vec!["-9"];
        args.extend(pids.iter().map(String::as_str));
        // Some may already be gone; what matters is that none is left, checked below.
        let _ = command_output("kill", &args);
        let deadline = std::time::Instant::now() + READY_DEADLINE;
        while victims
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "postgres processes {victims:?} still alive after kill -9"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin_dir.join(tool);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let output = command
            .args(args)
            .output()
            .with_context(|| format!("run {}", program.display()))?;
        if !output.status.success() {
            let server_log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            anyhow::bail!(
                "{tool} failed ({}):\n{}{}\nserver log:\n{server_log}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "stop"],
        );
    }
}

/// Directory holding `initdb` and `pg_ctl`: `PATH` first, then the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian installs them only there).
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("initdb/pg_ctl not found on PATH nor in /usr/lib/postgresql/*/bin")
}

/// Pids whose parent is `parent`, from /proc (Linux).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // Format: "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

fn running_as_root() -> anyhow::Result<bool> {
    // /proc/self is owned by the process's effective uid: no libc (unsafe) needed.
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

fn command_output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_only_the_path() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://h", "x").unwrap(),
            "postgresql://h/x"
        );
        assert!(with_database("host=h dbname=d", "x").is_err());
    }

    #[test]
    fn compose_pins_the_same_postgres_image() {
        assert_eq!(
            crate::compose_file::service("postgres").image(),
            format!("{POSTGRES_IMAGE}:{POSTGRES_TAG}")
        );
    }
}
