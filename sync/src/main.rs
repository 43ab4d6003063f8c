//! The `ds-sync` binary: parses arguments, sets up logging and the shutdown signal, and calls the
//! library. `run` follows and mirrors; `migrate` only applies the schema.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ds_sync::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "ds-sync",
    version,
    about = "Mirror Durable Streams into Postgres exactly once"
)]
struct Cli {
    /// Optional TOML file, layered over the defaults and under DS_SYNC__* variables.
    #[arg(long, global = true, env = "DS_SYNC_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then follow the configured streams until SIGINT/SIGTERM.
    Run,
    /// Apply pending migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    init_logging(config.log.format);
    match cli.command {
        Command::Migrate => {
            ds_sync::db::migrate(&config)
                .await
                .context("ds-sync migrate")?;
            tracing::info!("migrations applied");
        }
        Command::Run => {
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                signal.cancel();
            });
            ds_sync::run(config, shutdown)
                .await
                .context("ds-sync run")?;
        }
    }
    Ok(())
}

/// `RUST_LOG` filters (default `info`); colours only for a terminal, so files and log pipelines
/// get no ANSI codes.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
