//! `ds-server` binary: parse arguments, set up logging, run until SIGTERM or ctrl-c.

use std::path::PathBuf;

use clap::Parser;
use ds_server::config::{self, Config};

/// jemalloc instead of glibc's allocator. In the durable modes dozens of requests wait for a
/// commit at once, each holding its buffers and futures, and they are freed on other threads
/// than allocated them; glibc's per-thread caches overflow and every request pays for its
/// arenas' bins (`_int_malloc`, `malloc_consolidate`: a seventh of file-durable's CPU). See
/// server/STORAGE.md for the measurements.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "ds-server", version, about = "Durable Streams protocol server", after_help = config::help_text())]
struct Args {
    /// TOML configuration file (environment variables override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the configuration table as Markdown and exit.
    #[arg(long, hide = true)]
    print_config_table: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_config_table {
        print!("{}", config::markdown_table());
        return Ok(());
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ds-server: {e}");
            std::process::exit(2);
        }
    };
    init_logging(config.log.format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let app = ds_server::App::build(config).await?;
            tracing::info!(addr = %app.local_addr()?, "ds-server listening");
            app.run(shutdown_signal()).await
        })
}

/// `RUST_LOG` filters (default `info`); colours only for a terminal, so files and log pipelines
/// get no ANSI codes.
fn init_logging(format: config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        config::LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        config::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
