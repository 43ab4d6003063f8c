//! `ds`: parse the command line, run it, exit with the code the README documents.

use std::process::ExitCode;

use clap::Parser;
use ds_cli::args::Cli;
use ds_cli::error::exit;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.upstream_defaults = std::env::args_os()
        .next()
        .is_some_and(|argv0| ds_cli::invoked_as_upstream(&argv0));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ds: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(ds_cli::run(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(error) => {
            eprintln!("ds: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
